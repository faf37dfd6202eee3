"""Labeled classification tasks and their length-bucketed batches.

Tasks come in the paper's layout (a directory with `train.jsonl`, `dev.jsonl`, `test.jsonl` and
optionally `unlabeled.jsonl` for TAPT), as explicit split -> jsonl paths, or from a Hugging Face
dataset or a prepared TFDS dataset (`tfds:<name>`, found in TFDS_DATA_DIR) ("validation" is renamed
"dev"; an "unsupervised"/"unlabeled" split feeds TAPT only).
Labels are indexed in sorted order of the train labels.

Batches group examples of similar length: each example goes to the smallest bucket length that
holds it, so short examples are not padded to 512. Batch shapes come from a small fixed set
(one per bucket) to bound recompilation; partial batches are filled with weight-0 copies of a
real row (not empty rows, whose fully masked attention could produce NaN).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerFast

from dontstop_jax import files
from dontstop_jax.data.corpus import (
    CorpusSource,
    iter_documents,
    iter_jsonl,
    iter_tfds_rows,
    load_hf_dataset,
    load_tfds,
    record_field,
    tfds_text,
)
from dontstop_jax.data.tokenizer import encode_plain, special_ids
from dontstop_jax.errors import UserError

SPLIT_FILES = ("train", "dev", "test")
UNLABELED_SPLITS = ("unsupervised", "unlabeled")  # Hugging Face split names used only for TAPT
TOKENIZE_BATCH = 1000

Batch = dict[str, np.ndarray]


@dataclasses.dataclass
class Task:
    """splits: name -> (texts, label indices into label_names). tapt_sources: text for TAPT."""

    name: str
    label_names: list[str]
    splits: dict[str, tuple[list[str], np.ndarray]]
    tapt_sources: list[CorpusSource]


def load_task(
    source: str | os.PathLike | Mapping[str, str] | None = None,
    text_field: str = "text",
    label_field: str = "label",
    hf_dataset: str | None = None,
    name: str | None = None,
) -> Task:
    """Load a task from a directory, a {split: jsonl path} dict, `tfds:<name>` (a prepared TFDS dataset), or
    `hf_dataset` (local path or cached name)."""
    if (source is None) == (hf_dataset is None):
        raise UserError("give a task directory / split files or hf_dataset, exactly one of them")
    if hf_dataset is not None:
        raw, tapt = _read_hf(hf_dataset, text_field, label_field)
        name = name or os.path.basename(hf_dataset.rstrip("/"))
    elif isinstance(source, str) and source.startswith("tfds:"):
        raw, tapt = _read_tfds(source.removeprefix("tfds:"), text_field, label_field)
        name = name or source.removeprefix("tfds:").split("/")[0].split(":")[0]
    else:
        assert source is not None  # exactly one of source, hf_dataset
        paths = _split_paths(source)
        raw = {
            split: _read_jsonl(path, text_field, label_field) for split, path in paths.items() if split != "unlabeled"
        }
        tapt = [
            CorpusSource(paths[s], format="jsonl", text_field=text_field) for s in ("train", "unlabeled") if s in paths
        ]
        name = name or (os.path.basename(os.fspath(source).rstrip("/")) if not isinstance(source, Mapping) else "task")
    if "train" not in raw:
        raise UserError(f"task {name} has no train split; provide train.jsonl (or a 'train' split)")
    label_names, index = _label_vocabulary(raw["train"][1])
    splits = {}
    for split, (texts, labels) in raw.items():
        unknown = next((label for label in labels if label not in index), None)
        if unknown is not None:
            raise UserError(
                f"task {name}: label {unknown!r} in split {split} does not occur in train; "
                "fix the label or add it to train"
            )
        splits[split] = (texts, np.array([index[label] for label in labels], np.int32))
    return Task(name, [str(v) for v in label_names], splits, tapt)


def require_splits(task: Task, purpose: str) -> None:
    """Fine-tuning and the reference scores learn on train, select on dev and report test: all three must exist,
    and train must hold two classes at least (with one, every model scores 100% and learns nothing)."""
    for split in SPLIT_FILES:
        if split not in task.splits:
            raise UserError(f"task {task.name} has no {split} split; {purpose} needs train, dev and test")
    if len(task.label_names) < 2:
        found = f"every train example has label {task.label_names[0]!r}" if task.label_names else "train is empty"
        raise UserError(
            f"task {task.name}: {found}; {purpose} needs two classes at least: check the label field "
            "(task.label_field) or the train split"
        )


def stratified_draw(labels: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Sorted indices of `size` of `labels`, each class keeping its share (largest remainders, at least one
    example each): a learning curve's small train sets stay comparable to the full one. Each class's examples
    are taken in the order of one permutation drawn from rng(seed), so the same draw always comes back."""
    labels = np.asarray(labels)
    classes, counts = np.unique(labels, return_counts=True)
    if not len(classes) <= size <= len(labels):
        raise UserError(
            f"a train size of {size} cannot keep all {len(classes)} classes of {len(labels)} train "
            f"examples; use a size between {len(classes)} and {len(labels)} (or 'all')"
        )
    share = size * counts / len(labels)
    take = np.maximum(1, np.floor(share)).astype(int)
    while take.sum() > size:  # the at-least-one rule overshot: take back from the most over-served class
        take[np.argmax(np.where(take > 1, take - share, -np.inf))] -= 1
    while take.sum() < size:  # hand out the rest by largest remainder
        take[np.argmax(np.where(take < counts, share - take, -np.inf))] += 1
    rng = np.random.default_rng(seed)
    return np.sort(
        np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:n] for c, n in zip(classes, take, strict=True)])
    )


def with_train_size(task: Task, size: int, seed: int) -> Task:
    """The task with its train split cut to a stratified draw of `size` examples (see `stratified_draw`)."""
    texts, labels = task.splits["train"]
    keep = stratified_draw(labels, size, seed)
    return dataclasses.replace(task, splits={**task.splits, "train": ([texts[i] for i in keep], labels[keep])})


def per_class_draw(labels: np.ndarray, k: int, seed: int | list[int], split: str = "train") -> np.ndarray:
    """Sorted indices of `k` examples of each class of `labels`, each class's taken in the order of one permutation
    drawn from rng(seed): LM-BFF's few-shot sampling (Gao et al. 2021), the same draw for the same seed."""
    labels = np.asarray(labels)
    classes, counts = np.unique(labels, return_counts=True)
    if counts.min() < k:
        raise UserError(
            f"{k} examples per class: the {split} split has only {counts.min()} of one class; "
            f"use at most {counts.min()} shots"
        )
    rng = np.random.default_rng(seed)
    return np.sort(np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:k] for c in classes]))


def with_shots(task: Task, k: int, seed: int) -> Task:
    """The few-shot task of draw `seed`: `k` train examples per class and, as in LM-BFF, a dev set of the same size
    (`k` per class, drawn separately): model selection on a full dev set would use more labels than training
    does. Test stays whole."""
    splits = dict(task.splits)
    for split, stream in (("train", 0), ("dev", 1)):
        texts, labels = splits[split]
        keep = per_class_draw(labels, k, [seed, stream], split)
        splits[split] = ([texts[i] for i in keep], labels[keep])
    return dataclasses.replace(task, splits=splits)


def task_unlabeled_texts(task: Task) -> list[str]:
    """Texts for task-adaptive pretraining: the train texts, plus unlabeled.jsonl when the task has one."""
    return [doc for source in task.tapt_sources for doc in iter_documents(source)]


def tokenize_split(texts: Sequence[str], tokenizer: PreTrainedTokenizerFast, max_seq_length: int) -> list[np.ndarray]:
    """int32 `<s> tokens </s>` per text, truncated to max_seq_length."""
    ids = special_ids(tokenizer)
    out = []
    for start in range(0, len(texts), TOKENIZE_BATCH):
        for tokens in encode_plain(tokenizer, texts[start : start + TOKENIZE_BATCH]):
            out.append(np.array([ids["bos"], *tokens[: max_seq_length - 2], ids["eos"]], np.int32))
    return out


class ClassificationBatches:
    """Length-bucketed classification batches; `batch_size` is global, each host gets its row slice.

    Training (shuffle=True): examples are shuffled within buckets and batch order is shuffled, both
    from rng([seed, epoch]). Eval (shuffle=False): fixed order. Either way every example appears
    exactly once per epoch; filler rows have example_weights 0.
    """

    def __init__(
        self,
        token_lists: Sequence[np.ndarray],
        labels: np.ndarray,
        batch_size: int,
        seed: int,
        *,
        pad_id: int,
        max_seq_length: int = 512,
        bucket_lengths: Sequence[int] = (32, 64, 128, 256, 512),
        shuffle: bool = True,
        process_index: int = 0,
        process_count: int = 1,
    ) -> None:
        self.lengths = np.array([len(t) for t in token_lists], np.int64)
        if len(token_lists) == 0 or len(token_lists) != len(labels):
            raise UserError(
                f"got {len(token_lists)} examples and {len(labels)} labels; need as many labels as (>0) examples"
            )
        if self.lengths.max() > max_seq_length:
            raise UserError(
                f"an example has {self.lengths.max()} tokens > max_seq_length {max_seq_length}; "
                "tokenize with truncation"
            )
        if batch_size < 1 or batch_size % process_count:
            raise UserError(f"batch size {batch_size} must be a positive multiple of the process count {process_count}")
        self.tokens = token_lists
        self.labels = np.asarray(labels, np.int32)
        self.batch_size = batch_size
        self.seed = seed
        self.pad_id = pad_id
        self.shuffle = shuffle
        local = batch_size // process_count
        self.local_rows = slice(process_index * local, (process_index + 1) * local)
        self.bucket_lengths = sorted({min(b, max_seq_length) for b in bucket_lengths} | {max_seq_length})
        bucket_of = np.searchsorted(self.bucket_lengths, self.lengths)  # smallest bucket >= length
        self.members = [np.flatnonzero(bucket_of == k) for k in range(len(self.bucket_lengths))]
        self.num_batches = sum(math.ceil(len(m) / batch_size) for m in self.members)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        """This host's batches of `epoch` from batch `start` on (the same plan on every host; a run resumed
        mid-epoch continues with exactly the batches an uninterrupted run would see)."""
        for length, indices in self._plan(epoch)[start:]:
            yield self._batch(length, indices)

    def padding_stats(self) -> dict[str, float]:
        """Fraction of batch cells holding real tokens, bucketed vs. padding everything to max length."""
        useful = float(self.lengths.sum())
        bucketed = sum(
            math.ceil(len(m) / self.batch_size) * self.batch_size * b
            for m, b in zip(self.members, self.bucket_lengths, strict=True)
        )
        fixed = math.ceil(len(self.lengths) / self.batch_size) * self.batch_size * self.bucket_lengths[-1]
        return {"useful_fraction": useful / bucketed, "useful_fraction_fixed_length": useful / fixed}

    def _plan(self, epoch: int) -> list[tuple[int, np.ndarray]]:
        rng = np.random.default_rng([self.seed, epoch])
        plan = []
        for length, members in zip(self.bucket_lengths, self.members, strict=True):
            order = rng.permutation(members) if self.shuffle else members
            plan += [(length, order[i : i + self.batch_size]) for i in range(0, len(order), self.batch_size)]
        if self.shuffle:
            plan = [plan[i] for i in rng.permutation(len(plan))]
        return plan

    def _batch(self, length: int, indices: np.ndarray) -> Batch:
        fill = self.batch_size - len(indices)
        weights = np.concatenate([np.ones(len(indices)), np.zeros(fill)]).astype(np.float32)[self.local_rows]
        rows = np.concatenate([indices, np.full(fill, indices[0])])[self.local_rows]
        input_ids = np.full((len(rows), length), self.pad_id, np.int32)
        for r, i in enumerate(rows):
            input_ids[r, : self.lengths[i]] = self.tokens[i]
        mask = (np.arange(length) < self.lengths[rows][:, None]).astype(np.int32)
        return {"input_ids": input_ids, "attention_mask": mask, "labels": self.labels[rows], "example_weights": weights}


def _split_paths(source: str | os.PathLike | Mapping[str, str]) -> dict[str, str]:
    if isinstance(source, Mapping):
        return {split: os.fspath(path) for split, path in source.items()}
    directory = files.path(source)
    if not directory.is_dir():
        raise UserError(f"task directory {source} not found; pass a directory with train.jsonl, dev.jsonl, test.jsonl")
    names = (*SPLIT_FILES, "unlabeled")
    return {s: os.fspath(directory / f"{s}.jsonl") for s in names if (directory / f"{s}.jsonl").is_file()}


def _read_jsonl(path: str, text_field: str, label_field: str) -> tuple[list[str], list[Any]]:
    if not files.path(path).is_file():
        raise UserError(f"task file {path} not found; check the split paths")
    texts, labels = [], []
    for lineno, record in iter_jsonl(path):
        where = f"{path} line {lineno}"
        texts.append(record_field(record, text_field, where, str))
        labels.append(record_field(record, label_field, where, (str, int)))
    return texts, labels


def _read_hf(
    name: str, text_field: str, label_field: str
) -> tuple[dict[str, tuple[list[str], list[Any]]], list[CorpusSource]]:
    """Labeled splits, plus TAPT sources: train and any "unsupervised"/"unlabeled" split (e.g. IMDB's)."""
    dataset = load_hf_dataset(name)
    if not isinstance(dataset, Mapping):
        raise UserError(f"dataset {name} has no named splits; save a DatasetDict with train/validation/test")
    splits, tapt = {}, []
    for split, ds in dataset.items():
        unlabeled = split in UNLABELED_SPLITS
        if split == "train" or unlabeled:
            tapt.append(CorpusSource(f"hf:{name}", format="hf", text_field=text_field, split=split))
        for column in (text_field,) if unlabeled else (text_field, label_field):
            if column not in ds.column_names:
                raise UserError(
                    f"dataset {name} split {split} has no column {column!r} (columns: {', '.join(ds.column_names)}); "
                    "set the field name"
                )
        if not unlabeled:
            labels = list(ds[label_field])
            names = getattr(ds.features[label_field], "names", None)  # ClassLabel: ints -> names; -1 stays
            labels = [names[v] if v >= 0 else v for v in labels] if names else labels
            splits["dev" if split == "validation" else split] = (list(ds[text_field]), labels)
    return splits, tapt


def _read_tfds(
    name: str, text_field: str, label_field: str
) -> tuple[dict[str, tuple[list[str], list[Any]]], list[CorpusSource]]:
    """As `_read_hf`, for a prepared TFDS dataset: ClassLabel ints become their names, IMDB's "unsupervised"
    split (label -1) feeds TAPT only."""
    splits, tapt = {}, []
    for split, ds in load_tfds(name).items():
        unlabeled = split in UNLABELED_SPLITS
        if split == "train" or unlabeled:
            tapt.append(CorpusSource(f"tfds:{name}", format="tfds", text_field=text_field, split=split))
        if unlabeled:
            continue
        features = ds.dataset_info.features
        if missing := [c for c in (text_field, label_field) if c not in features]:
            raise UserError(
                f"TFDS dataset {name} split {split} has no feature {missing[0]!r} (features: "
                f"{', '.join(features)}); set the field name"
            )
        names = getattr(features[label_field], "names", None)  # ClassLabel: ints -> names
        texts, labels = [], []
        for i, row in enumerate(iter_tfds_rows(ds)):
            texts.append(tfds_text(row, text_field, f"TFDS {name} split {split} record {i}"))
            labels.append(_tfds_label(row[label_field], names))
        splits["dev" if split == "validation" else split] = (texts, labels)
    return splits, tapt


def _tfds_label(value: Any, names: list[str] | None) -> Any:
    """A label as the other task formats give it: a ClassLabel's name, text as str, a number as int."""
    value = value.item() if isinstance(value, np.generic | np.ndarray) else value
    if isinstance(value, bytes):
        return value.decode("utf-8")
    return names[value] if names and 0 <= value < len(names) else value


def _label_vocabulary(train_labels: list[Any]) -> tuple[list[Any], dict[Any, int]]:
    try:
        values = sorted(set(train_labels))
    except TypeError:
        raise UserError("train labels mix numbers and strings; make all labels the same type") from None
    return values, {v: i for i, v in enumerate(values)}
