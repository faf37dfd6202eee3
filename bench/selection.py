"""Exact cosine top-k selection speed: our streaming jitted search vs faiss flat inner-product search.

Random unit-norm vectors stand in for document embeddings (the search cost does not depend on what the
vectors mean). Ours streams the corpus in chunks through `StreamingTopK` (memory: queries + one chunk +
the running top-k, whatever the corpus size); faiss `IndexFlatIP` holds every corpus vector. Both see the
same vectors and return the same neighbours (checked: the id agreement is printed).

    python bench/selection.py                                  # 1M documents x 10K queries, d=256, k=500
    python bench/selection.py --docs 100000 --queries 2000     # smaller; each size is recorded in bench/selection.json
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import numpy as np


def corpus_chunks(docs: int, dim: int, chunk: int, seed: int):
    """The corpus, generated chunk by chunk (never held whole by our search)."""
    for c, start in enumerate(range(0, docs, chunk)):
        yield np.random.default_rng([seed, c]).standard_normal((min(chunk, docs - start), dim), np.float32)


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run_ours(queries, args) -> tuple[float, np.ndarray]:
    from dontstop_jax.engine import make_mesh
    from dontstop_jax.selection.knn import StreamingTopK

    search = StreamingTopK(queries, args.k, make_mesh((-1, 1, 1)), approximate=args.approximate)
    search.update(np.zeros((args.chunk, args.dim), np.float32), 0)  # compile outside the timing
    search.set_result(*search.result())
    elapsed, offset = 0.0, 0
    for chunk in corpus_chunks(args.docs, args.dim, args.chunk, args.seed):
        t = time.perf_counter()
        search.update(chunk, offset, pad_to=args.chunk)
        search.result()  # waits for the device (and copies the [Q, k] top-k, a small cost kept in the timing)
        elapsed += time.perf_counter() - t
        offset += len(chunk)
    return elapsed, search.result()[1]


def run_faiss(queries, args) -> tuple[float, np.ndarray]:
    import faiss

    from dontstop_jax.selection.knn import normalize

    index = faiss.IndexFlatIP(args.dim)
    elapsed = 0.0
    for chunk in corpus_chunks(args.docs, args.dim, args.chunk, args.seed):
        chunk = normalize(chunk)
        t = time.perf_counter()
        index.add(chunk)
        elapsed += time.perf_counter() - t
    t = time.perf_counter()
    _, ids = index.search(normalize(queries), args.k)
    return elapsed + time.perf_counter() - t, ids


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--docs", type=int, default=1_000_000)
    p.add_argument("--queries", type=int, default=10_000)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--k", type=int, default=500)
    p.add_argument("--chunk", type=int, default=16_384, help="documents per streamed chunk (ours)")
    p.add_argument("--approximate", action="store_true", help="lax.approx_max_k instead of lax.top_k")
    p.add_argument("--devices", type=int, default=2, help="CPU devices to split the queries over (the cores)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    import jax

    jax.config.update("jax_num_cpu_devices", args.devices)

    queries = np.random.default_rng([args.seed, 1 << 30]).standard_normal((args.queries, args.dim), np.float32)
    ours_s, ours_ids = run_ours(queries, args)
    ours_rss = peak_rss_gib()
    faiss_s, faiss_ids = run_faiss(queries, args)
    agreement = float(np.mean([len(set(a) & set(b)) / args.k for a, b in zip(ours_ids, faiss_ids)]))
    result = {
        **vars(args),
        "backend": jax.default_backend(),
        "devices": jax.device_count(),
        "jax": jax.__version__,
        "ours_s": ours_s,
        "faiss_s": faiss_s,
        "ratio_ours_over_faiss": ours_s / faiss_s,
        "neighbour_agreement": agreement,
        "peak_rss_after_ours_gib": ours_rss,
        "peak_rss_after_faiss_gib": peak_rss_gib(),
        "faiss_index_gib": args.docs * args.dim * 4 / 2**30,
    }
    out = Path(__file__).with_name("selection.json")  # one entry per problem size, the latest run of each
    runs = json.loads(out.read_text()) if out.exists() else {}
    runs[f"{args.docs}x{args.queries}x{args.dim}k{args.k}"] = result
    out.write_text(json.dumps(runs, indent=2, sort_keys=True))
    pairs = args.docs * args.queries
    print(f"| {args.docs:,} docs x {args.queries:,} queries, d={args.dim}, k={args.k} | seconds | pairs/s |")
    print("|:--|--:|--:|")
    print(
        f"| ours (streaming, chunk {args.chunk:,}, {jax.device_count()} {jax.default_backend()} device(s)) "
        f"| {ours_s:.1f} | {pairs / ours_s:.3g} |"
    )
    print(f"| faiss IndexFlatIP (whole corpus in memory) | {faiss_s:.1f} | {pairs / faiss_s:.3g} |")
    print(
        f"\nratio ours/faiss: {ours_s / faiss_s:.2f}; neighbour agreement {agreement:.4f}; peak RSS after ours "
        f"{ours_rss:.2f} GiB, after faiss {result['peak_rss_after_faiss_gib']:.2f} GiB "
        f"(faiss index alone {result['faiss_index_gib']:.2f} GiB)"
    )


if __name__ == "__main__":
    main()
