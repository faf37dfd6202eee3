"""MLMLoader tokens/s with whole-word masking, without and with a span-masking term list (data/spans.py).

A generated corpus of pseudo-words with terms of 2-4 words planted in it, a byte-level BPE tokenizer trained on
it, 512-token blocks, batches of 64 built in this thread (no prefetch), so the number is the host's cost alone.

    python -m bench.span_masking                  # 1,000 terms
    python -m bench.span_masking --terms 10000
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from dontstop_jax.data import MLMLoader, SpanMasker, load_tokenizer, prepare_corpus, special_ids, word_start_table
from dontstop_jax.synthetic.tokenizer import save_tokenizer, train_bpe

BATCH, SEQ = 64, 512


def write_corpus(path: Path, n_terms: int, docs: int = 4000, seed: int = 0) -> list[str]:
    """Documents alternating 10 random words and one planted term; returns the terms."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words = sorted({"".join(rng.choice(letters, rng.integers(3, 10))) for _ in range(3000)})
    terms = sorted({" ".join(rng.choice(words, rng.integers(2, 5))) for _ in range(n_terms)})
    lines = (" ".join(f"{' '.join(rng.choice(words, 10))} {rng.choice(terms)}" for _ in range(4)) for _ in range(docs))
    path.write_text("\n".join(lines) + "\n")
    return terms


def tokens_per_second(loader: MLMLoader, batches: int) -> float:
    loader.batch(0, 0)  # warm
    start = time.perf_counter()
    for i in range(batches):
        loader.batch(0, i % loader.steps_per_epoch)
    return batches * BATCH * SEQ / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--terms", type=int, default=1000)
    parser.add_argument("--batches", type=int, default=16)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        terms = write_corpus(root / "docs.txt", args.terms)
        save_tokenizer(train_bpe([root / "docs.txt"], 8000), root / "tok", terms[:3])
        tok = load_tokenizer(root / "tok")
        corpus = prepare_corpus([str(root / "docs.txt")], root / "tok", root / "cache", max_seq_length=SEQ)
        ids = special_ids(tok)
        masker = SpanMasker(tok, terms, 0.5, ids)
        first, _ = masker.spans(corpus.blocks(np.arange(BATCH)).astype(np.int32))
        print(f"{corpus.num_blocks} blocks; {masker.summary['patterns']} patterns; {first.sum() / BATCH:.1f} spans/row")
        for name, spans in [("whole-word", None), (f"whole-word + {len(terms)} terms", masker)]:
            loader = MLMLoader(
                corpus,
                BATCH,
                0,
                ids,
                vocab_size=len(tok),
                whole_word=True,
                word_starts_table=word_start_table(tok),
                span_masker=spans,
                prefetch=0,
            )
            rate = tokens_per_second(loader, args.batches)
            print(f"{name}: {rate:,.0f} tokens/s ({BATCH * SEQ / rate * 1000:.1f} ms per {BATCH}x{SEQ} batch)")


if __name__ == "__main__":
    main()
