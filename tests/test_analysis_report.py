"""`dontstop analyze` on small known inputs: vocabulary overlap, fixed-mask MLM loss, figures, the report."""

import csv
import importlib.util
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np
import pytest

from dontstop_jax.analysis import plots, results_table
from dontstop_jax.analysis.mlm_eval import MaskingSpec, fixed_batches, mlm_losses
from dontstop_jax.analysis.report import analyze
from dontstop_jax.analysis.vocab import overlap_percent, top_words, unigram_counts, vocab_overlap, words
from dontstop_jax.errors import UserError
from dontstop_jax.model import RobertaForMaskedLM, init_params, tiny_config
from dontstop_jax.phases.defaults import pretrain_config
from dontstop_jax.phases.pretrain import pretrain
from dontstop_jax.synthetic import generate_benchmark, write_heldout
from dontstop_jax.train.source import ModelSource, resolve

ROOT = Path(__file__).parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CONFIG = ROOT / "configs" / "analyze.py"


def _lines(path: Path, docs: list[str]) -> str:
    path.write_text("\n".join(docs) + "\n")
    return str(path)


def _png(path: Path) -> np.ndarray:
    """The decoded image (fails on anything but a valid PNG)."""
    import matplotlib.image

    assert path.read_bytes()[:8] == PNG_MAGIC
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and min(image.shape[:2]) > 50
    return image


def test_words_drop_case_digits_punctuation_and_stopwords():
    assert words("The Cell's DNA, 42 times: don't-stop!") == ["the", "cell's", "dna", "times", "don't", "stop"]
    assert unigram_counts(["The cell and the cell", "a CELL binds"]) == {"cell": 3, "binds": 1}
    assert top_words(unigram_counts(["z z y x w"]), 3) == {"z", "w", "x"}  # tie w/x/y at the cut: alphabetical


def test_overlap_matrix_on_hand_made_corpora(tmp_path):
    # Even documents form half 0, odd ones half 1; stopwords never count.
    corpora = {
        "fruit": [_lines(tmp_path / "f.txt", ["apple banana cherry the", "apple banana cherry of"])],
        "mixed": [_lines(tmp_path / "m.txt", ["apple banana date", "apple banana date and"])],
        "split": [_lines(tmp_path / "s.txt", ["kiwi lemon", "kiwi mango"])],
    }
    result = vocab_overlap(corpora, top_k=10)
    expected: list[list[float]] = [[100, 200 / 3, 0], [200 / 3, 100, 0], [0, 0, 50]]
    np.testing.assert_allclose(result.overlap, expected)
    assert result.docs == (2, 2, 2)
    result.write_csv(tmp_path / "overlap.csv")
    rows = list(csv.reader((tmp_path / "overlap.csv").open()))
    assert rows[0] == ["corpus", "fruit", "mixed", "split"] and rows[3] == ["split", "0.00", "0.00", "50.00"]
    assert overlap_percent(frozenset("ab"), frozenset("abcd")) == 100.0  # relative to the smaller vocabulary
    with pytest.raises(UserError, match="needs >= 2"):
        vocab_overlap({"one": [_lines(tmp_path / "one.txt", ["lonely words"])]})


def test_synthetic_domains_share_less_vocabulary_with_general_text_than_with_themselves(tmp_path):
    bench = generate_benchmark(tmp_path / "bench", scale="tiny")
    heldout = write_heldout(bench, 600)
    lines = heldout["bio"].read_text().splitlines()
    assert len(lines) == 600 and not set(lines) & set(bench.domain_corpora["bio"].read_text().splitlines())
    stamp = heldout["bio"].stat().st_mtime_ns
    assert write_heldout(bench, 600) == heldout and heldout["bio"].stat().st_mtime_ns == stamp  # reused as is
    result = vocab_overlap({name: [str(p)] for name, p in heldout.items()}, top_k=200)
    m = dict(zip(result.names, result.overlap))
    general = result.names.index("general")
    for i, domain in enumerate(result.names):
        if domain != "general":
            assert m[domain][general] < m[domain][i] - 20 and m["general"][i] < m[domain][i] - 20, result.overlap


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_tokenizer_dir):
    """A tiny MLM phase trained from scratch on repetitive text, and held-out text of the same kind."""
    root = tmp_path_factory.mktemp("analysis")
    rng = np.random.default_rng(0)
    vocab = ["protein", "binds", "cell", "gene", "the", "receptor", "domain", "adaptive"]
    docs = [" ".join(rng.choice(vocab, 24)) for _ in range(400)]
    train = _lines(root / "train.txt", docs[:300])
    heldout = _lines(root / "heldout.txt", docs[300:])
    cfg = pretrain_config("dapt")
    workdir = root / "grid" / "pretrain" / "base-0123456789"  # as the grid names its phases
    cfg.update(init="scratch", tokenizer=tiny_tokenizer_dir, workdir=str(workdir))
    cfg.model.update(
        vocab_size=400,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=34,
    )
    cfg.data.update(sources=[train], max_seq_length=32, cache_dir=str(root / "cache"))
    cfg.train.update(batch_size=16, accum_steps=1, steps=40, log_every=5)
    cfg.optim.learning_rate = 3e-3
    cfg.checkpoint.every = 0
    pretrain(cfg)
    return root, cfg, {"heldout": [heldout]}


@pytest.mark.slow
def test_fixed_masks_give_every_checkpoint_the_same_batches_and_loss(trained, tiny_tokenizer_dir):
    root, cfg, corpora = trained
    spec = MaskingSpec(cache_dir=str(root / "cache"), max_seq_length=32, batch_size=16, max_batches=3)
    first, again = (fixed_batches(corpora["heldout"], tiny_tokenizer_dir, spec) for _ in range(2))
    assert len(first) == 3
    for a, b in zip(first, again):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    source = resolve(cfg.workdir)
    losses = [mlm_losses(source, {"heldout": first})["heldout"] for _ in range(2)]
    np.testing.assert_array_equal(losses[0], losses[1])
    assert losses[0][2] == sum(b["mlm_weights"].sum() for b in first)  # every masked token counted once

    model = RobertaForMaskedLM(source.config)
    untrained = ModelSource(
        source.config,
        jax.tree_util.tree_map(np.asarray, nn.unbox(init_params(model, jax.random.key(1)))),
        source.tokenizer_dir,
        "random init",
    )
    before = mlm_losses(untrained, {"heldout": first})["heldout"][0]
    assert losses[0][0] < before - 1.0, (before, losses[0][0])  # 40 MLM steps on this kind of text


def test_unusable_checkpoints_and_batch_sizes_are_user_errors():
    encoder = ModelSource(tiny_config(), {"roberta": {}}, "unused", "a bare encoder")
    with pytest.raises(UserError, match="has no lm_head weights"):
        mlm_losses(encoder, {"x": [{"input_ids": np.zeros((8, 16), np.int32)}]})
    mlm = ModelSource(tiny_config(max_position_embeddings=18), {"roberta": {}, "lm_head": {}}, "unused", "tiny")
    with pytest.raises(UserError, match="lower mlm.max_seq_length"):
        mlm_losses(mlm, {"x": [{"input_ids": np.zeros((8, 32), np.int32)}]})
    with pytest.raises(UserError, match="mlm.batch_size 4 is not divisible"):  # 8 test devices
        mlm_losses(mlm, {"x": [{"input_ids": np.zeros((4, 16), np.int32)}]})


def _write_results(grid: Path) -> None:
    records = [
        {"task": t, "variant": v, "seed": s, "metrics": {"macro_f1": score + 0.01 * s}}
        for t in ("bio_topic", "cs_topic")
        for v, score in (("baseline", 0.5), ("dapt", 0.7))
        for s in (0, 1, 2)
    ]
    results_table(records, {"bio_topic": "macro_f1", "cs_topic": "macro_f1"}).write_all(grid)


@pytest.mark.slow
def test_analyze_writes_every_table_and_figure_and_replaces_an_old_report(trained, tmp_path):
    root, _, corpora = trained
    _write_results(root / "grid")
    cfg = _config("custom")
    cfg.update(out_dir=str(tmp_path / "report"), grid_dir=str(root / "grid"))
    other = _lines(tmp_path / "other.txt", ["zebra lion tiger " * 5, "lion zebra mouse " * 5] * 20)
    cfg.corpora = {**corpora, "other": [other]}
    cfg.mlm.update(cache_dir=str(root / "cache"), max_seq_length=32, batch_size=16, max_batches=2)
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "stale.txt").write_text("from an older analysis")

    out = analyze(cfg)
    assert sorted(p.name for p in out.iterdir()) == [
        "mlm_loss.csv",
        "mlm_loss.png",
        "results.png",
        "summary.md",
        "training_curves.png",
        "vocab_overlap.csv",
        "vocab_overlap.png",
    ]
    assert not list(tmp_path.glob(".report*"))  # no staging or backup directory left behind
    rows = list(csv.DictReader((out / "mlm_loss.csv").open()))
    assert [(r["checkpoint"], r["corpus"]) for r in rows] == [("base", "heldout"), ("base", "other")]
    loss = {r["corpus"]: float(r["mlm_loss"]) for r in rows}
    assert loss["heldout"] < loss["other"]  # trained on this text, never saw the other
    summary = (out / "summary.md").read_text()
    for name in ("vocab_overlap.png", "mlm_loss.png", "training_curves.png", "results.png", "| base |"):
        assert name in summary
    images = [_png(out / f) for f in ("vocab_overlap.png", "mlm_loss.png", "training_curves.png", "results.png")]
    assert all(img.std() > 0 for img in images)  # not blank


def test_figures_are_valid_pngs(tmp_path):
    heat = plots.heatmap(
        np.array([[1.0, 2.0], [3.0, 4.0]]), ["a", "b"], ["c", "d"], tmp_path / "h.png", title="t", label="l"
    )
    _png(heat)
    log = tmp_path / "metrics.jsonl"
    log.write_text(
        "".join(
            f'{{"step": {s}, "phase": "train/", "loss": {5 - s / 10}, "learning_rate": 0.001, '
            f'"tokens_per_s": 1000.0}}\n'
            for s in range(1, 11)
        )
        + '{"step": 10, "phase": "dev/"}\n'
    )
    assert len(plots.read_metrics(log)) == 10
    _png(plots.training_curves({"run": log}, tmp_path / "curves.png"))
    _write_results(tmp_path)
    _png(plots.results_bars(tmp_path / "results.json", tmp_path / "bars.png"))
    with pytest.raises(UserError, match="run the grid first"):
        plots.results_bars(tmp_path / "missing.json", tmp_path / "x.png")


def _config(arg: str):
    spec = importlib.util.spec_from_file_location("analyze_cfg", CONFIG)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def test_missing_matplotlib_is_a_user_error_before_any_work(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(UserError, match="pip install"):
        plots.heatmap(np.eye(2), ["a", "b"], ["a", "b"], tmp_path / "x.png", title="t", label="l")
    with pytest.raises(UserError, match="pip install"):
        analyze(_config("custom"))


def test_a_failed_analysis_leaves_the_previous_report_alone(tmp_path):
    cfg = _config("custom")
    cfg.out_dir = str(tmp_path / "report")
    good = _lines(tmp_path / "good.txt", ["alpha beta", "beta gamma"])
    cfg.corpora = {"good": [good], "gone": [str(tmp_path / "missing.txt")]}
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "summary.md").write_text("the previous analysis")
    with pytest.raises(UserError, match="matches no files"):
        analyze(cfg)
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == ["report"]  # no staging directory left
    assert (tmp_path / "report" / "summary.md").read_text() == "the previous analysis"


def test_cli_rejects_an_unknown_preset():
    out = subprocess.run(
        [sys.executable, "-m", "dontstop_jax", "analyze", "--config", f"{CONFIG}:nope"],
        check=False,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 2 and "unknown analysis preset 'nope'" in out.stderr


_TWO_HOSTS = """
import sys
from dontstop_jax import distributed
distributed.initialize()
import jax
from dontstop_jax.analysis import report
from dontstop_jax.errors import Fault
from ml_collections import ConfigDict

cfg = ConfigDict(eval(sys.argv[1]))
published = report.publishing
def counted(where, **kwargs):  # the report's publications on this process
    print("publish", where, flush=True)
    return published(where, **kwargs)
report.publishing = counted
report.analyze(cfg)
cfg.out_dir = sys.argv[2]  # under a file: process 0's write fails
try:
    report.analyze(cfg)
except Fault as err:  # process 1: told, not left waiting
    print("fault", str(err).split("(")[0], flush=True)
except OSError:  # process 0: its own error
    print("failed", flush=True)
"""


def test_on_two_hosts_only_process_0_writes_the_report_and_its_failure_reaches_the_other(tmp_path):
    """Two real processes analyse the same inputs: process 0 alone publishes the report, which equals one process's;
    when its write fails, process 1 raises instead of waiting."""
    from local_processes import run_local_processes

    cfg = _config("custom")
    cfg.corpora = {
        "a": [_lines(tmp_path / "a.txt", ["alpha beta gamma", "beta gamma delta"] * 5)],
        "b": [_lines(tmp_path / "b.txt", ["gamma delta zebra", "zebra lion alpha"] * 5)],
    }
    cfg.vocab.top_k = 3
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text(
        "".join(f'{{"step": {s}, "phase": "train/", "loss": {5 - s / 10}}}\n' for s in range(1, 6))
    )
    cfg.curves = {"run": str(tmp_path / "run")}
    cfg.out_dir = str(tmp_path / "one")
    one = analyze(cfg)
    (tmp_path / "file").write_text("not a directory")
    cfg.out_dir = str(tmp_path / "two")
    outputs = run_local_processes(_TWO_HOSTS, repr(cfg.to_dict()), str(tmp_path / "file" / "report"), timeout=180)
    assert [line for line in outputs[0].splitlines() if line.startswith(("publish", "fault", "failed"))] == [
        f"publish {tmp_path / 'two'}",
        f"publish {tmp_path / 'file' / 'report'}",
        "failed",
    ]
    assert [line for line in outputs[1].splitlines() if line.startswith(("publish", "fault", "failed"))] == [
        f"fault process 0 failed in write the analysis {tmp_path / 'file' / 'report'} "
    ]
    two = tmp_path / "two"
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    for name in ("summary.md", "vocab_overlap.csv"):
        assert (two / name).read_text() == (one / name).read_text()
