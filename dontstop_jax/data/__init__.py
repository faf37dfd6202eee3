"""Data layer: corpora -> packed token blocks -> masked-LM batches, and labeled task batches."""

from dontstop_jax.data.corpus import CorpusSource, corpus_fingerprint, iter_documents, parse_source
from dontstop_jax.data.loader import MLMLoader
from dontstop_jax.data.masking import mask_tokens, word_start_table
from dontstop_jax.data.prepare import PreparedCorpus, prepare_corpus
from dontstop_jax.data.tasks import ClassificationBatches, Task, load_task, task_unlabeled_texts, tokenize_split
from dontstop_jax.data.tokenizer import load_tokenizer, special_ids, tokenizer_fingerprint

__all__ = [
    "ClassificationBatches",
    "CorpusSource",
    "MLMLoader",
    "PreparedCorpus",
    "Task",
    "corpus_fingerprint",
    "iter_documents",
    "load_task",
    "load_tokenizer",
    "mask_tokens",
    "parse_source",
    "prepare_corpus",
    "special_ids",
    "task_unlabeled_texts",
    "tokenize_split",
    "tokenizer_fingerprint",
    "word_start_table",
]
