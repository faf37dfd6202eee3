"""Write the synthetic domain-shift benchmark to disk, or reuse a complete one.

Layout under `out_dir`:
    general/corpus.txt                    pretraining corpus, one document per line
    domains/<d>/corpus.txt                unlabeled domain text (DAPT)
    domains/<d>/clusters.txt              ground truth: the label index each corpus line is about
    tasks/<d>_topic/{train,dev,test}.jsonl  {"text", "label"}; train uses only "seen" label words
    tasks/<d>_topic/unlabeled.jsonl       {"text"}: in-task text mixing seen and unseen words (TAPT)
    tokenizer/                            RoBERTa-style byte-level BPE (save_pretrained)
    benchmark.json                        parameters, paths, counts, ground truth; written last
"""

from __future__ import annotations

import json
import logging
import os
import time
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import numpy as np

from dontstop_jax.errors import UserError
from dontstop_jax.files import write_text
from dontstop_jax.synthetic import corpus
from dontstop_jax.synthetic.spec import GENERATOR_VERSION, BenchmarkSpec, make_spec
from dontstop_jax.synthetic.tokenizer import save_tokenizer, train_bpe, word_pieces
from dontstop_jax.synthetic.vocab import build_lexicon

log = logging.getLogger(__name__)

MANIFEST = "benchmark.json"
FORMAT = "dontstop-synthetic"
SPLITS = ("train", "dev", "test")


@dataclass(frozen=True)
class TaskPaths:
    name: str
    domain: str
    labels: tuple[str, ...]
    train: Path
    dev: Path
    test: Path
    unlabeled: Path


@dataclass(frozen=True)
class BenchmarkPaths:
    root: Path
    manifest: Path
    general_corpus: Path
    domain_corpora: Mapping[str, Path]
    tasks: Mapping[str, TaskPaths]
    tokenizer: Path
    params: Mapping[str, Any] = field(compare=False)
    reused: bool = field(default=False, compare=False)  # True when an existing benchmark was kept


def task_name(domain: str) -> str:
    return f"{domain}_topic"


def _rng(spec: BenchmarkSpec, stream: str) -> np.random.Generator:
    """An independent stream per output, so adding a domain leaves the others unchanged."""
    return np.random.default_rng([spec.seed, 2, zlib.crc32(stream.encode())])


def _write_atomic(path: Path, lines: list[str]) -> None:
    write_text(path, "".join(line + "\n" for line in lines))


def _jsonl(texts: list[str], labels: list[str] | None) -> list[str]:
    if labels is None:
        return [json.dumps({"text": t}) for t in texts]
    return [json.dumps({"text": t, "label": y}) for t, y in zip(texts, labels)]


def _layout(spec: BenchmarkSpec) -> dict[str, Any]:
    """Relative paths of every output, as stored in the manifest."""
    return {
        "general_corpus": "general/corpus.txt",
        "domains": {d: f"domains/{d}/corpus.txt" for d in spec.domains},
        # Ground truth for analysis: line i = index (into the task's labels) of corpus line i's cluster.
        "domain_doc_clusters": {d: f"domains/{d}/clusters.txt" for d in spec.domains},
        "tasks": {
            task_name(d): {"domain": d, **{s: f"tasks/{task_name(d)}/{s}.jsonl" for s in (*SPLITS, "unlabeled")}}
            for d in spec.domains
        },
        "tokenizer": "tokenizer",
    }


def _paths(root: Path, manifest: dict[str, Any], reused: bool) -> BenchmarkPaths:
    rel = manifest["paths"]
    labels = {t: tuple(v["labels"]) for t, v in manifest["counts"]["tasks"].items()}
    tasks = {
        name: TaskPaths(
            name=name,
            domain=v["domain"],
            labels=labels[name],
            **{s: root / v[s] for s in (*SPLITS, "unlabeled")},
        )
        for name, v in rel["tasks"].items()
    }
    return BenchmarkPaths(
        root=root,
        manifest=root / MANIFEST,
        general_corpus=root / rel["general_corpus"],
        domain_corpora={d: root / p for d, p in rel["domains"].items()},
        tasks=tasks,
        tokenizer=root / rel["tokenizer"],
        params=manifest["params"],
        reused=reused,
    )


def _read_manifest(root: Path) -> dict[str, Any] | None:
    try:
        manifest = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        return None
    return manifest


def _files_present(paths: BenchmarkPaths) -> bool:
    files = [paths.general_corpus, *paths.domain_corpora.values(), paths.tokenizer / "tokenizer.json"]
    files += [p.with_name("clusters.txt") for p in paths.domain_corpora.values()]
    for t in paths.tasks.values():
        files += [t.train, t.dev, t.test, t.unlabeled]
    return all(f.is_file() for f in files)


def load_benchmark(out_dir: str | os.PathLike) -> BenchmarkPaths:
    """The paths of a complete benchmark previously written to `out_dir`."""
    root = Path(out_dir)
    manifest = _read_manifest(root)
    if manifest is None:
        raise UserError(f"synthetic: no complete benchmark in {root}; run generate_benchmark({str(root)!r}) first")
    paths = _paths(root, manifest, reused=True)
    if not _files_present(paths):
        raise UserError(f"synthetic: benchmark in {root} is missing files; delete {root / MANIFEST} to regenerate")
    return paths


def generate_benchmark(
    out_dir: str | os.PathLike, seed: int = 0, scale: str = "default", **overrides: Any
) -> BenchmarkPaths:
    """Generate the benchmark into `out_dir`, or reuse it if one with identical parameters is there.

    `overrides` replace individual `BenchmarkSpec` fields (e.g. domains=("bio", "cs", "news"),
    label_noise=0.0). Deterministic: the same arguments give byte-identical files.
    """
    spec = make_spec(seed, scale, **overrides)
    root = Path(out_dir)
    wanted = {"version": GENERATOR_VERSION, "params": spec.to_json()}
    manifest = _read_manifest(root)
    if manifest is not None and {k: manifest.get(k) for k in wanted} == wanted:
        paths = _paths(root, manifest, reused=True)
        if _files_present(paths):
            log.info("synthetic: reusing benchmark in %s", root)
            return paths

    start = time.perf_counter()
    root.mkdir(parents=True, exist_ok=True)
    (root / MANIFEST).unlink(missing_ok=True)  # incomplete until the new manifest lands
    layout = _layout(spec)
    lex = build_lexicon(spec)

    general = corpus.general_corpus(lex, spec, _rng(spec, "general"))
    _write_atomic(root / layout["general_corpus"], general)
    counts: dict[str, Any] = {"general": _count(general), "domains": {}, "tasks": {}}
    probe = general[:3]
    for d in spec.domains:
        docs, clusters = corpus.domain_corpus(lex, lex.domains[d], spec, _rng(spec, f"domain/{d}"))
        _write_atomic(root / layout["domains"][d], docs)
        counts["domains"][d] = _count(docs)
        _write_atomic(root / layout["domain_doc_clusters"][d], [str(c) for c in clusters])
        probe += docs[:3]

    noisy: dict[str, dict[str, list[int]]] = {}
    for d in spec.domains:
        name, dom = task_name(d), lex.domains[d]
        files = layout["tasks"][name]
        counts["tasks"][name] = {"domain": d, "labels": list(dom.labels)}
        noisy[name] = {}
        for split, n, pool in (
            ("train", spec.n_train, "seen"),
            ("dev", spec.n_dev, "unseen"),
            ("test", spec.n_test, "unseen"),
            ("unlabeled", spec.n_unlabeled, "all"),
        ):
            rng = _rng(spec, f"task/{d}/{split}")
            texts, truth = corpus.task_texts(lex, dom, spec, rng, n, cast(corpus.Pool, pool))
            entry: dict[str, Any] = _count(texts)
            if split == "unlabeled":
                _write_atomic(root / files[split], _jsonl(texts, None))
            else:
                y = corpus.noisy_labels(rng, truth, spec.n_clusters, spec.label_noise)
                _write_atomic(root / files[split], _jsonl(texts, [dom.labels[i] for i in y]))
                entry["label_counts"] = {lab: int((y == i).sum()) for i, lab in enumerate(dom.labels)}
                noisy[name][split] = np.flatnonzero(y != truth).tolist()
            counts["tasks"][name][split] = entry
            probe += texts[:2]

    corpora = [root / layout["general_corpus"], *(root / p for p in layout["domains"].values())]
    tok = train_bpe(corpora, spec.tokenizer_vocab_size)
    pieces = np.array(word_pieces(tok, lex.all_words()))
    if pieces.max() > 2:
        raise UserError(f"synthetic: {int((pieces > 2).sum())} pseudo-words need >2 tokens; raise tokenizer_vocab_size")
    save_tokenizer(tok, root / layout["tokenizer"], probe)

    manifest = {
        "format": FORMAT,
        **wanted,
        "paths": layout,
        "counts": counts,
        "tokenizer": {
            "vocab_size": tok.get_vocab_size(),
            "special_tokens": {t: tok.token_to_id(t) for t in ("<s>", "<pad>", "</s>", "<unk>", "<mask>")},
            "pieces_per_word": {str(i): int((pieces == i).sum()) for i in range(1, int(pieces.max()) + 1)},
        },
        "ground_truth": {
            **lex.to_json(),
            "noisy_label_indices": noisy,  # per task and split: lines whose label was flipped
        },
    }
    _write_atomic(root / MANIFEST, [json.dumps(manifest, indent=1)])  # last: marks completeness
    log.info("synthetic: generated benchmark in %s (%.1fs)", root, time.perf_counter() - start)
    return _paths(root, manifest, reused=False)


def _count(texts: list[str]) -> dict[str, int]:
    return {"n": len(texts), "words": sum(t.count(" ") + 1 for t in texts)}


def write_heldout(bench: BenchmarkPaths, n_docs: int) -> dict[str, Path]:
    """{"general" and each domain: a file of `n_docs` fresh documents}, drawn like the training corpora but from
    their own random streams: held-out text for the analysis (vocabulary overlap, MLM loss) that no phase saw.
    Files are named by `n_docs` and reused, so their prepared (tokenized) caches stay valid."""
    if n_docs < 2:
        raise UserError(f"synthetic: held-out samples need >= 2 documents, got {n_docs}")
    spec = replace(make_spec(**bench.params), n_general_docs=n_docs, n_domain_docs=n_docs)
    lex = build_lexicon(spec)
    paths = {name: bench.root / "heldout" / f"{name}-{n_docs}.txt" for name in ("general", *spec.domains)}
    for name, path in paths.items():
        if path.is_file():
            continue
        rng = _rng(spec, f"heldout/{name}")
        docs = (
            corpus.general_corpus(lex, spec, rng)
            if name == "general"
            else corpus.domain_corpus(lex, lex.domains[name], spec, rng)[0]
        )
        _write_atomic(path, docs)
    return paths
