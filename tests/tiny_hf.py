"""A tiny RoBERTa that `transformers` writes, with a test tokenizer: what a Hugging Face model directory looks
like to the code that imports one (real-data flows, Hub ids, buckets, TFDS tasks)."""

from __future__ import annotations

import shutil
from pathlib import Path


def save_tiny_roberta(directory: Path, tokenizer_dir: str, vocab_size: int | None = None) -> Path:
    """config.json + weights of a random 2-layer, 32-wide RoBERTa (seed 0) and the tokenizer's files, in
    `directory`; `vocab_size` defaults to the tokenizer's size."""
    import torch
    import transformers

    from dontstop_jax.data import load_tokenizer

    directory.mkdir(parents=True, exist_ok=True)
    for f in Path(tokenizer_dir).iterdir():
        shutil.copyfile(f, directory / f.name)
    torch.manual_seed(0)
    transformers.RobertaForMaskedLM(
        transformers.RobertaConfig(
            vocab_size=vocab_size or len(load_tokenizer(tokenizer_dir)),
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=66,
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=2,
        )
    ).save_pretrained(directory)
    return directory


WORDS = "protein binds receptor cell kinase inhibitor gene expression tumor patient dose trial enzyme".split()


def write_biomed_data(corpus: Path, task: Path, corpus_docs: int) -> None:
    """Random biomedical-word documents (seed 0): `corpus_docs` of them as corpus/part-0.jsonl.gz, then 200/50/50
    as the task's train/dev/test.jsonl, labeled ACTIVATOR when they mention a kinase (a learnable rule)."""
    import gzip
    import json

    import numpy as np

    rng = np.random.default_rng(0)
    docs = [" ".join(rng.choice(WORDS, rng.integers(8, 40))) for _ in range(corpus_docs + 300)]
    corpus.mkdir(parents=True)
    with gzip.open(corpus / "part-0.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in docs[:corpus_docs])
    task.mkdir(parents=True)
    splits = {
        "train": docs[corpus_docs : corpus_docs + 200],
        "dev": docs[corpus_docs + 200 : corpus_docs + 250],
        "test": docs[corpus_docs + 250 :],
    }
    for split, rows in splits.items():
        (task / f"{split}.jsonl").write_text(
            "".join(
                json.dumps({"text": d, "label": "ACTIVATOR" if "kinase" in d else "INHIBITOR"}) + "\n" for d in rows
            )
        )
