"""Data layer: corpora -> packed token blocks -> masked-LM batches, and labeled task batches.

Names are imported on first use (PEP 562), so a process that needs one light module (prepare's encoding
workers import only `piece_cache` and `encode_pool`) does not pay for transformers and JAX.
"""

import importlib

_MODULE_OF = {
    "CorpusSource": "corpus",
    "corpus_fingerprint": "corpus",
    "iter_documents": "corpus",
    "parse_source": "corpus",
    "MLMLoader": "loader",
    "mask_tokens": "masking",
    "word_start_table": "masking",
    "PreparedCorpus": "prepare",
    "prepare_corpus": "prepare",
    "ClassificationBatches": "tasks",
    "Task": "tasks",
    "load_task": "tasks",
    "task_unlabeled_texts": "tasks",
    "tokenize_split": "tasks",
    "SpanMasker": "spans",
    "load_terms": "spans",
    "load_tokenizer": "tokenizer",
    "special_ids": "tokenizer",
    "tokenizer_fingerprint": "tokenizer",
}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_MODULE_OF[name]}"), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
