"""Shared fixtures. No hub access: every tokenizer or model used in tests is built here from scratch."""

from __future__ import annotations

import pytest

TINY_TEXTS = [
    "the quick brown fox jumps over the lazy dog",
    "domain adaptive pretraining helps on biomedical papers",
    "task adaptive pretraining uses the unlabeled task data",
    "hello world, this is a tiny tokenizer for unit tests",
    "reviews of movies and products are a domain too",
]


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A RoBERTa-like byte-level BPE tokenizer (<s> <pad> </s> <unk> <mask> at ids 0..4), saved to disk."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from dontstop_jax.synthetic.tokenizer import wrap

    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(TINY_TEXTS * 5, trainer)
    backend.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    tok = wrap(backend)
    path = tmp_path_factory.mktemp("tiny_tokenizer")
    tok.save_pretrained(path)
    return str(path)
