"""Movable runs: a phase records its parent and data by what they hold, not where, so a finished grid copied to
another disk, into a bucket and back retrains nothing and prints the same table; and workdirs recorded by an older
version (places as written, directories named by that fingerprint) are still found and reused, then movable."""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
from pathlib import Path

import pytest
from tiny_pretrain import cli

from dontstop_jax import files
from dontstop_jax.errors import UserError
from dontstop_jax.phases.defaults import finetune_config, pretrain_config
from dontstop_jax.phases.grid import phase_config
from dontstop_jax.train.workdir import (
    CONFIG,
    DONE,
    INPUTS,
    Workdir,
    fingerprint,
    legacy_fingerprint,
)

RESULTS = ("pretrain", "finetune", "references")  # what a rerun that retrains nothing leaves untouched


@pytest.fixture(scope="module")
def bucket(tmp_path_factory):
    from gcs_emulator import gcs_emulator

    with gcs_emulator(tmp_path_factory.mktemp("gcs") / "data") as env:
        yield env


def _table(stdout: str) -> str:
    return stdout.split("\nwritten:")[0]


def _results(root: str) -> dict[str, tuple]:
    """{file: (size, when it was written)} of the phases and references under the grid `root` (local or gs://)."""
    if not files.is_remote(root):
        return {
            p.relative_to(root).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
            for part in RESULTS
            for p in (Path(root) / part).rglob("*")
            if p.is_file()
        }
    import gcsfs

    found = gcsfs.GCSFileSystem().find(root.split("://")[1], detail=True)
    return {
        k: (v["size"], v.get("generation"), v.get("updated")) for k, v in found.items() if k.split("/")[2] in RESULTS
    }


def _rerun(workdir: str, xla: Path, *extra: str) -> str:
    before = _results(workdir)
    stdout = cli("demo", "--scale", "tiny", f"--config.workdir={workdir}", *extra, "--compilation-cache", str(xla))
    assert _results(workdir) == before  # no phase ran: none wrote a file, none was added
    return stdout


@pytest.mark.slow
def test_a_finished_grid_copied_elsewhere_and_through_a_bucket_retrains_nothing(
    tiny_grid, tmp_path, monkeypatch, request
):
    """Rerunning in place is the copy's case with the same paths (tests/test_pipeline.py ran it before)."""
    root, stdout = tiny_grid
    phases = sum(1 for part in ("pretrain", "finetune") for _ in (root / "grid" / part).iterdir())
    assert phases == 15  # 5 pretraining and 10 fine-tuning phases, all kept below

    elsewhere = tmp_path / "disk2" / "grid"  # local to local, without the prepared-data cache
    shutil.copytree(root / "grid", elsewhere, ignore=lambda d, _: ["cache"] if d == str(root / "grid") else [])
    assert _table(_rerun(str(elsewhere), root / "xla")) == _table(stdout)

    if not (importlib.util.find_spec("gcsfs") and importlib.util.find_spec("gcp_storage_emulator")):
        pytest.skip("the bucket half needs gcsfs and gcp-storage-emulator (the test extra)")
    request.getfixturevalue("bucket")
    import gcsfs

    monkeypatch.setenv(files.CACHE_ENV, str(tmp_path / "host-cache"))
    gcsfs.GCSFileSystem.clear_instance_cache()  # local to the bucket (the benchmark generator writes local files)
    gcsfs.GCSFileSystem().put(str(elsewhere), "bkt/grid", recursive=True)
    bench = f"--config.synthetic.directory={elsewhere / 'benchmark'}"
    assert _table(_rerun("gs://bkt/grid", root / "xla", bench)) == _table(stdout)

    back = tmp_path / "disk3" / "grid"  # the bucket to local
    gcsfs.GCSFileSystem().get("bkt/grid", str(back), recursive=True)
    assert _table(_rerun(str(back), root / "xla")) == _table(stdout)
    assert (back / "results.md").read_text() == (root / "grid" / "results.md").read_text()


def _old_record(cfg) -> None:
    """`cfg` as an older version left it: finished, recorded with its places as written, in a directory named by
    that fingerprint."""
    cfg.workdir = str(Path(cfg.workdir).parent / f"{cfg.name}-{legacy_fingerprint(cfg)}")
    workdir = Path(cfg.workdir)
    (workdir / "checkpoints").mkdir(parents=True)
    (workdir / CONFIG).write_text(
        json.dumps(
            {"phase": cfg.name, "fingerprint": legacy_fingerprint(cfg), "config": json.loads(cfg.to_json_best_effort())}
        )
    )
    (workdir / DONE).write_text(json.dumps({"phase": cfg.name, "test": {"macro_f1": 0.5}}))


def _grid_phases(grid: Path, data: Path, old: bool = False) -> list:
    """A grid's base phase (from scratch on a corpus) and a fine-tune from it, placed as the grid places them;
    `old`: made as an older version made them (named by the legacy fingerprint, recorded with places as written)."""
    base = phase_config(
        pretrain_config("dapt"),
        grid / "pretrain",
        "base",
        init="scratch",
        tokenizer=str(data / "tokenizer"),
        **{"data.sources": [str(data / "*.txt")]},
    )
    if old:
        _old_record(base)
    tune = phase_config(
        finetune_config(), grid / "finetune", "task-baseline-s0", init=base.workdir, **{"task.path": str(data / "task")}
    )
    if old:
        _old_record(tune)
    return [base, tune]


def test_a_grid_recorded_by_an_older_version_is_reused_updated_once_and_then_movable(tmp_path, caplog):
    old, data = tmp_path / "old" / "grid", tmp_path / "old" / "grid" / "benchmark"
    for name, text in [
        ("general.txt", "a b c\n"),
        ("bio.txt", "d e\n"),
        ("tokenizer/vocab.json", "{}"),
        ("task/train.jsonl", "{}\n"),
        ("task/dev.jsonl", "{}\n"),
    ]:
        (data / name).parent.mkdir(parents=True, exist_ok=True)
        (data / name).write_text(text)
    made = _grid_phases(old, data, old=True)
    copy = tmp_path / "copy"  # a copy of an older version's workdir, its original still there: the same inputs
    shutil.copytree(made[1].workdir, copy)
    tune = phase_config(
        finetune_config(), copy.parent, "tune", init=made[0].workdir, **{"task.path": str(data / "task")}
    )
    tune.workdir = str(copy)
    assert Workdir(tune).claim() is not None
    tune.task.path = str(data / "tokenizer")
    with pytest.raises(UserError, match=r'task.path: "2 files, 6 bytes, #\w+" -> "1 files, 2 bytes'):
        Workdir(tune).claim()

    with caplog.at_level(logging.INFO, logger="dontstop_jax.train.workdir"):
        for phase in _grid_phases(old, data):  # found under the old names, reused, records updated
            assert phase.workdir.endswith(legacy_fingerprint(phase)) and fingerprint(phase) not in phase.workdir
            assert Workdir(phase).claim() == json.loads((Path(phase.workdir) / DONE).read_text())
            assert INPUTS in json.loads((Path(phase.workdir) / CONFIG).read_text())
    assert sum("by content" in r.getMessage() for r in caplog.records) == 2  # once per workdir
    base, tune = (json.loads((Path(p.workdir) / CONFIG).read_text()) for p in _grid_phases(old, data))
    assert tune[INPUTS]["init"] == f"phase {base['fingerprint']}"

    moved = tmp_path / "new" / "grid"
    shutil.move(old, moved)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dontstop_jax.train.workdir"):
        for phase in _grid_phases(moved, moved / "benchmark"):  # found by their records' fingerprints
            assert Path(phase.workdir).parent.parent == moved and Workdir(phase).claim() is not None
    assert not [r for r in caplog.records if "by content" in r.getMessage()]

    (moved / "benchmark" / "bio.txt").write_text("d e f\n")  # what the data holds counts, not where it is
    base, tune = _grid_phases(moved, moved / "benchmark")
    assert not Path(base.workdir).exists() and not Path(tune.workdir).exists()
    base.workdir = str(next((moved / "pretrain").iterdir()))
    with pytest.raises(UserError, match=r"finished with another config \(data.sources: \["):
        Workdir(base).claim()


def test_a_moved_phase_reads_the_tokenizer_that_moved_with_it(tmp_path):
    """A phase records its tokenizer's path (checkpoint meta): gone after a move, the same place relative to the
    phase is where the copy (a grid's benchmark) now is; a tokenizer outside the moved tree stays as recorded."""
    from dontstop_jax.train.source import relocated

    now = tmp_path / "disk2" / "grid"
    (now / "benchmark" / "tokenizer").mkdir(parents=True)
    workdir = files.path(now / "pretrain" / "base-0123456789")
    made_in = "/gone/grid/pretrain/base-0123456789"
    assert relocated("/gone/grid/benchmark/tokenizer", made_in, workdir) == str(now / "benchmark" / "tokenizer")
    assert relocated("/gone/tokenizers/t", made_in, workdir) == "/gone/tokenizers/t"
    assert relocated(str(now / "benchmark"), made_in, workdir) == str(now / "benchmark")  # still there
