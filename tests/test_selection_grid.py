"""Selection rows in the grid, end to end through the CLI on the tiny synthetic benchmark: select -> TAPT on
task text + selected documents -> fine-tune -> results table; and LM mean-pooled embeddings from its base model."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dontstop_jax.phases.defaults import select_config
from dontstop_jax.phases.select import select

pytestmark = pytest.mark.slow
ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    root = tmp_path_factory.mktemp("selection-grid")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "dontstop_jax",
            "demo",
            "--scale",
            "tiny",
            f"--config.workdir={root / 'grid'}",
            f"--config.synthetic.directory={root / 'bench'}",
            "--config.seeds=[0]",
            '--config.variants=["tapt","knn_tapt_50","rand_tapt"]',
            "--config.select.embedding.kind=tfidf",
            "--config.tapt.train.epochs=1",
            "--config.finetune.train.epochs=1",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return root / "grid", out.stdout


def _done(root, pattern):
    (path,) = root.glob(pattern)
    return json.loads((path / "DONE.json").read_text())


def test_selection_rows_join_the_table_and_tapt_reads_the_selected_documents(grid):
    root, stdout = grid
    assert "| knn_tapt_50 |" in stdout and "| rand_tapt |" in stdout
    records = json.loads((root / "records.json").read_text())["records"]
    assert {r["variant"] for r in records} == {"tapt", "knn_tapt_50", "rand_tapt"}
    knn = _done(root, "select/select-bio_topic-knn_tapt_50-*")
    rand = _done(root, "select/select-bio_topic-rand_tapt-*")
    assert rand["size"] == rand["n"] == knn["size"] > 0  # RAND-TAPT: as many documents as kNN-TAPT k=50
    plain = _done(root, "pretrain/tapt-bio_topic-[0-9a-f]*")
    with_knn = _done(root, "pretrain/tapt-bio_topic-knn_tapt_50-*")
    assert with_knn["corpus_blocks"] > plain["corpus_blocks"]
    assert with_knn["parent"] == plain["parent"]  # kNN-TAPT starts from the base model, like TAPT


def test_lm_mean_pooled_embeddings_select_from_the_base_model(grid, tmp_path):
    root, _ = grid
    (base,) = root.glob("pretrain/base-*")
    bench = root.parent / "bench"
    cfg = select_config()
    cfg.update(dict(workdir=str(tmp_path / "lm"), k=5, chunk_size=256))
    cfg.task.path = str(bench / "tasks" / "bio_topic")
    cfg.sources = [str(bench / "domains" / "bio" / "corpus.txt")]
    cfg.embedding.update(kind="lm")
    cfg.embedding.lm.update(init=str(base), max_seq_length=64, batch_size=64)
    stats = select(cfg)
    assert stats["embedding"] == "lm" and stats["size"] > 0 and stats["task_coverage"] > 0.5
