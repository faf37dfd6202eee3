"""Labeled task loading, tokenization and length-bucketed batches."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dontstop_jax.data import ClassificationBatches, load_task, load_tokenizer, task_unlabeled_texts, tokenize_split
from dontstop_jax.data.tasks import require_splits
from dontstop_jax.errors import UserError


def write_jsonl(path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


@pytest.fixture
def task_dir(tmp_path):
    write_jsonl(
        tmp_path / "train.jsonl", [{"text": f"train {i}", "label": "pos" if i % 3 else "neg"} for i in range(6)]
    )
    write_jsonl(tmp_path / "dev.jsonl", [{"text": "dev a", "label": "neg"}, {"text": "dev b", "label": "pos"}])
    write_jsonl(tmp_path / "test.jsonl", [{"text": "test a", "label": "pos"}])
    return tmp_path


def test_fine_tuning_and_references_need_every_split(task_dir):
    require_splits(load_task(str(task_dir)), "fine-tuning")
    (task_dir / "dev.jsonl").unlink()
    with pytest.raises(UserError, match="has no dev split; scoring the references needs train, dev and test"):
        require_splits(load_task(str(task_dir)), "scoring the references")


def test_load_task_directory(task_dir):
    write_jsonl(task_dir / "unlabeled.jsonl", [{"text": "extra one"}, {"text": "extra two"}])
    task = load_task(task_dir, name="toy")
    assert task.name == "toy" and task.label_names == ["neg", "pos"]
    assert set(task.splits) == {"train", "dev", "test"}
    texts, labels = task.splits["dev"]
    assert texts == ["dev a", "dev b"] and labels.tolist() == [0, 1] and labels.dtype == np.int32
    assert task_unlabeled_texts(task) == [f"train {i}" for i in range(6)] + ["extra one", "extra two"]


def test_load_task_from_split_paths_with_custom_fields(tmp_path):
    paths = {
        "train": write_jsonl(tmp_path / "a.jsonl", [{"sentence": "x", "y": 2}, {"sentence": "z", "y": 10}]),
        "dev": write_jsonl(tmp_path / "b.jsonl", [{"sentence": "w", "y": 10}]),
    }
    task = load_task(paths, text_field="sentence", label_field="y")
    assert task.label_names == ["2", "10"]  # numeric labels sort numerically
    assert task.splits["dev"][1].tolist() == [1]


@pytest.mark.parametrize(
    ("dev_record", "message"),
    [
        ({"text": "d", "label": "neutral"}, "label 'neutral' in split dev does not occur in train"),
        ({"text": "d"}, r"dev\.jsonl line 1 has no field 'label'"),
        ({"label": "pos"}, r"dev\.jsonl line 1 has no field 'text'"),
    ],
)
def test_bad_task_input(task_dir, dev_record, message):
    write_jsonl(task_dir / "dev.jsonl", [dev_record])
    with pytest.raises(UserError, match=message) as info:
        load_task(task_dir)
    assert "\n" not in str(info.value)


def test_task_without_train(tmp_path):
    write_jsonl(tmp_path / "dev.jsonl", [{"text": "d", "label": "a"}])
    with pytest.raises(UserError, match="no train split"):
        load_task(tmp_path)
    with pytest.raises(UserError, match=r"task directory .* not found"):
        load_task(tmp_path / "missing")


def test_hf_task(tmp_path):
    pytest.importorskip("datasets")
    write_jsonl(tmp_path / "train.jsonl", [{"review": "good", "stars": "5"}, {"review": "bad", "stars": "1"}])
    write_jsonl(tmp_path / "validation.jsonl", [{"review": "meh", "stars": "1"}])
    task = load_task(hf_dataset=str(tmp_path), text_field="review", label_field="stars")
    assert task.label_names == ["1", "5"] and task.splits["dev"][0] == ["meh"]
    assert task.splits["dev"][1].tolist() == [0]
    assert task_unlabeled_texts(task) == ["good", "bad"]
    with pytest.raises(UserError, match="split train has no column 'text'"):
        load_task(hf_dataset=str(tmp_path))


def test_hf_saved_dataset_with_class_labels_and_unsupervised_split(tmp_path):
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])})
    splits = {
        "train": {"text": ["good", "bad", "fine"], "label": [1, 0, 1]},
        "test": {"text": ["great"], "label": [1]},
        "unsupervised": {"text": ["no label here"], "label": [-1]},
    }
    dataset = datasets.DatasetDict({k: datasets.Dataset.from_dict(v, features=features) for k, v in splits.items()})
    dataset.save_to_disk(str(tmp_path / "saved"))
    task = load_task(hf_dataset=str(tmp_path / "saved"))
    assert task.label_names == ["neg", "pos"] and set(task.splits) == {"train", "test"}
    assert task.splits["train"][1].tolist() == [1, 0, 1]
    assert task_unlabeled_texts(task) == ["good", "bad", "fine", "no label here"]


def test_tokenize_split(tiny_tokenizer_dir):
    tok = load_tokenizer(tiny_tokenizer_dir)
    short, long = tokenize_split(["hello", "the quick brown fox jumps over the lazy dog " * 5], tok, 12)
    assert short.dtype == np.int32 and short[0] == 0 and short[-1] == 2
    assert len(long) == 12 and long[0] == 0 and long[-1] == 2
    np.testing.assert_array_equal(
        long[1:-1], tok("the quick brown fox jumps over the lazy dog " * 5)["input_ids"][1:11]
    )


def examples(n: int = 103, seed: int = 0) -> list[np.ndarray]:
    """Example i is [0, 5 + i, 3, 3, ..., 2]: its id is readable from column 1."""
    lengths = np.random.default_rng(seed).integers(3, 120, n)
    return [np.array([0, 5 + i] + [3] * (length - 3) + [2], np.int32) for i, length in enumerate(lengths)]


def make_batches(tokens, **kwargs) -> ClassificationBatches:
    args = {"batch_size": 8, "seed": 1, "pad_id": 1, "max_seq_length": 128, "bucket_lengths": (16, 32, 64)} | kwargs
    return ClassificationBatches(tokens, np.arange(len(tokens)) % 3, **args)


@pytest.mark.parametrize("shuffle", [True, False])
def test_buckets_cover_each_example_once(shuffle):
    tokens = examples()
    batches = make_batches(tokens, shuffle=shuffle)
    seen = []
    epoch = list(batches.epoch(0))
    assert len(epoch) == batches.num_batches
    for batch in epoch:
        assert batch["input_ids"].shape[1] in (16, 32, 64, 128) and batch["input_ids"].shape[0] == 8
        real = batch["example_weights"] == 1
        ids = batch["input_ids"][real, 1] - 5
        seen += ids.tolist()
        lengths = np.array([len(tokens[i]) for i in ids])
        np.testing.assert_array_equal(batch["attention_mask"][real].sum(1), lengths)
        np.testing.assert_array_equal(batch["labels"][real], ids % 3)
        assert (lengths > batch["input_ids"].shape[1] // 2).all() or batch["input_ids"].shape[1] == 16
        assert (batch["input_ids"][batch["attention_mask"] == 0] == 1).all()
    assert sorted(seen) == list(range(len(tokens)))
    stats = batches.padding_stats()
    assert stats["useful_fraction"] > stats["useful_fraction_fixed_length"]


def test_shuffle_order_depends_on_epoch_only():
    batches = make_batches(examples())
    order = lambda e: [b["input_ids"][:, 1].tolist() for b in batches.epoch(e)]  # noqa: E731
    assert order(0) == order(0) and order(0) != order(1)
    fixed = make_batches(examples(), shuffle=False)
    assert [b["input_ids"][:, 1].tolist() for b in fixed.epoch(0)] == [
        b["input_ids"][:, 1].tolist() for b in fixed.epoch(5)
    ]


def test_eval_padding_rows_have_zero_weight():
    tokens = examples(n=13)
    batches = make_batches(tokens, shuffle=False)
    weights = np.concatenate([b["example_weights"] for b in batches.epoch(0)])
    assert weights.sum() == 13 and len(weights) == 8 * batches.num_batches and (weights == 0).any()


def test_hosts_split_classification_batches():
    tokens = examples()
    whole = list(make_batches(tokens).epoch(2))
    parts = [list(make_batches(tokens, process_index=p, process_count=2).epoch(2)) for p in range(2)]
    for one, a, b in zip(whole, *parts, strict=True):
        for key in one:
            np.testing.assert_array_equal(one[key], np.concatenate([a[key], b[key]]))
    with pytest.raises(UserError, match="> max_seq_length 64"):
        make_batches(tokens, max_seq_length=64)
