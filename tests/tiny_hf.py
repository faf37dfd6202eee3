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
    transformers.RobertaForMaskedLM(transformers.RobertaConfig(
        vocab_size=vocab_size or len(load_tokenizer(tokenizer_dir)), hidden_size=32, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=64, max_position_embeddings=66, pad_token_id=1, bos_token_id=0,
        eos_token_id=2)).save_pretrained(directory)
    return directory
