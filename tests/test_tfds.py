"""TFDS sources without TensorFlow: a tiny IMDB-like dataset this test builds (array_record, which tfds writes and
reads with no TensorFlow), read as a corpus source (`tfds:name`, `data_dir` or TFDS_DATA_DIR) and as a task."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tiny_hf import save_tiny_roberta

from dontstop_jax.data import iter_documents, load_task, prepare_corpus, task_unlabeled_texts
from dontstop_jax.errors import UserError

tfds = pytest.importorskip("tensorflow_datasets")
pytest.importorskip("array_record")
ROOT = Path(__file__).parents[1]
WORDS = "the film was good bad plot actor scene long short great dull music story".split()
SPLITS = {"train": 40, "validation": 12, "test": 12, "unsupervised": 10}


def _docs(split: str) -> list[tuple[str, int]]:
    """(text, label) rows of `split`: label 1 when "good" or "great" occurs, -1 for the unlabeled split."""
    rng = np.random.default_rng(list(SPLITS).index(split))
    texts = [" ".join(rng.choice(WORDS, rng.integers(4, 20))) for _ in range(SPLITS[split])]
    return [(t, -1 if split == "unsupervised" else int("good" in t or "great" in t)) for t in texts]


class TinyReviews(tfds.core.GeneratorBasedBuilder, skip_registration=True):  # type: ignore[call-arg, name-defined]  # tfds comes from importorskip
    """IMDB's layout (text, ClassLabel neg/pos; an unsupervised split labelled -1), in a few rows. Not
    registered: it is read back from its files, as a dataset prepared elsewhere would be."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        features = {"text": tfds.features.Text(), "label": tfds.features.ClassLabel(names=["neg", "pos"])}
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(split) for split in SPLITS}

    def _generate_examples(self, split):
        for i, (text, label) in enumerate(_docs(split)):
            yield i, {"text": text, "label": label}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tfds")
    TinyReviews(data_dir=root, file_format="array_record").download_and_prepare()
    return root


def _stored(data_dir: Path, split: str) -> list[str]:
    """The split's texts in the order the prepared files hold them (tfds shuffles while preparing)."""
    return [r["text"].decode() for r in tfds.data_source("tiny_reviews", split=split, data_dir=data_dir)]


def test_a_tfds_corpus_packs_like_the_same_text_file(data_dir, tiny_tokenizer_dir, tmp_path):
    source = {"path": "tfds:tiny_reviews", "data_dir": str(data_dir)}
    docs = _stored(data_dir, "train")
    assert list(iter_documents(source)) == docs and sorted(docs) == sorted(t for t, _ in _docs("train"))
    lines = tmp_path / "train.txt"
    lines.write_text("\n".join(docs) + "\n")
    ours = prepare_corpus([source], tiny_tokenizer_dir, tmp_path / "out", max_seq_length=16)
    want = prepare_corpus([str(lines)], tiny_tokenizer_dir, tmp_path / "out", max_seq_length=16)
    assert ours.directory != want.directory and ours.manifest["documents"] == len(docs)
    np.testing.assert_array_equal(ours.blocks(np.arange(ours.num_blocks)), want.blocks(np.arange(want.num_blocks)))
    assert "tensorflow" not in sys.modules


def test_tfds_data_dir_env_and_other_splits(data_dir, monkeypatch):
    monkeypatch.setenv("TFDS_DATA_DIR", str(data_dir))
    assert list(iter_documents("tfds:tiny_reviews")) == _stored(data_dir, "train")
    assert list(iter_documents({"path": "tfds:tiny_reviews", "split": "test"})) == _stored(data_dir, "test")


@pytest.mark.parametrize(
    "source, problem",
    [
        (
            {"path": "tfds:no_such_set"},
            "cannot open TFDS dataset no_such_set (split train) in {dir}: Dataset no_such_set not found.",
        ),
        (
            {"path": "tfds:tiny_reviews", "split": "dev"},
            "cannot open TFDS dataset tiny_reviews (split dev) in {dir}: Unknown split 'dev'",
        ),
        (
            {"path": "tfds:tiny_reviews", "text_field": "body"},
            "TFDS tiny_reviews split train record 0 has no field 'body' (fields: label, text)",
        ),
        ({"path": "a.txt", "data_dir": "/d"}, "corpus source a.txt: data_dir applies to tfds: sources only"),
    ],
)
def test_tfds_source_errors_are_one_line(data_dir, source, problem):
    with pytest.raises(UserError) as err:
        list(iter_documents({**source, "data_dir": str(data_dir)} if "tfds" in source["path"] else source))
    assert str(err.value).startswith(problem.format(dir=data_dir)) and "\n" not in str(err.value)


def test_a_tfds_task_reads_like_a_hugging_face_one(data_dir, monkeypatch):
    monkeypatch.setenv("TFDS_DATA_DIR", str(data_dir))
    task = load_task("tfds:tiny_reviews")
    assert task.name == "tiny_reviews" and task.label_names == ["neg", "pos"]
    assert set(task.splits) == {"train", "dev", "test"}  # validation -> dev; unsupervised: TAPT only
    texts, labels = task.splits["dev"]
    assert sorted(zip(texts, labels, strict=True)) == sorted(_docs("validation"))
    assert [(s.path, s.split) for s in task.tapt_sources] == [
        ("tfds:tiny_reviews", s) for s in ("train", "unsupervised")
    ]
    assert task_unlabeled_texts(task) == _stored(data_dir, "train") + _stored(data_dir, "unsupervised")
    with pytest.raises(UserError, match="TFDS dataset tiny_reviews split train has no feature 'sentiment'"):
        load_task("tfds:tiny_reviews", label_field="sentiment")
    assert "tensorflow" not in sys.modules


def test_a_finetune_phase_on_a_tfds_task(data_dir, tiny_tokenizer_dir, tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    model = save_tiny_roberta(tmp_path / "roberta-tiny", tiny_tokenizer_dir, vocab_size=400)
    fields = {
        "init": str(model),
        "task.path": "tfds:tiny_reviews",
        "workdir": str(tmp_path / "ft"),
        "data.max_seq_length": 32,
        "train.batch_size": 8,
        "train.epochs": 1,
        "mesh.shape": "(-1, 1, 1)",
    }
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "dontstop_jax",
            "finetune",
            "--config",
            "configs/finetune.py:imdb",
            *[f"--config.{k}={v}" for k, v in fields.items()],
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "TFDS_DATA_DIR": str(data_dir)},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    done = json.loads((tmp_path / "ft" / "DONE.json").read_text())
    assert done["label_names"] == ["neg", "pos"] and "macro_f1" in done["test"]
