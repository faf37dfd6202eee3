"""Every command on two hosts that share nothing but a bucket: each case runs 2 processes through `launch/run.sh
local`, each with its own home (its working directory), temporary and cache directories, and the workdirs in an
emulated GCS bucket; the results equal one process's (tables and summaries, timing fields aside). The tiny demo
grid is stopped by SIGTERM at a hand-over between two phases (every process exits 75) and rerun to the end, with
process 1's first checkpoint read failing once: one run of two of its rows covers the corpora it prepares, its
pretraining and fine-tuning phases (each phase's summary and logged metrics), the grid and the hand-over. The
reference is the same rows run by one process holding 2 devices: the hosts' batch split, so the same dropout
masks (a device's dropout key follows its batch shard, engine/steps.py). The `prepare`, `select` and `export`
cases start from the two grids (their phases, benchmark and prepared corpora); continual compares with the
session's one-process continual run (conftest.py). The session's compilation cache is shared.

Also (not slow): a command on a machine without a TPU prints no libtpu start-up lines, with libtpu installed.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from test_interrupt import _without_timings

ROOT = Path(__file__).parents[1]
LAUNCH = str(ROOT / "launch" / "run.sh")
STOPPED = "; rerun the same command to continue"
VARIANTS, SEEDS = ("baseline", "dapt_tapt"), (0,)  # of the tiny demo: base, DAPT and TAPT phases, 2 fine-tunes
needs_bucket = pytest.mark.skipif(
    not (importlib.util.find_spec("gcsfs") and importlib.util.find_spec("gcp_storage_emulator")),
    reason="needs gcsfs and gcp-storage-emulator (the test extra)",
)


def test_no_libtpu_lines_without_a_tpu(tmp_path):
    """A command that starts JAX (here: export of an unfinished phase, refused after process 0 looked) prints its one
    error line and nothing of libtpu's, even with JAX_PLATFORMS unset."""
    (tmp_path / "phase" / "checkpoints").mkdir(parents=True)
    # libtpu stays quiet while another process holds its lock file (/tmp/libtpu_lockfile): this one ignores it
    env = {**{k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}, "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "dontstop_jax",
            "export",
            "--from",
            str(tmp_path / "phase"),
            "--to",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
    )
    assert out.returncode == 2, out.stderr[-3000:]
    assert out.stderr.strip().splitlines() == [
        f"error: --from={str(tmp_path / 'phase')!r} is a phase that has not "
        "finished (no DONE.json); rerun the command that trains it until it "
        "completes, then start from it"
    ]


def test_the_platform_is_left_to_jax_where_an_accelerator_may_be():
    from dontstop_jax.cli import quiet_platform

    for env in (
        {"TPU_NAME": "my-tpu"},
        {"DONTSTOP_TPU": "1"},
        {"TPU_WORKER_HOSTNAMES": "a,b"},
        {"JAX_PLATFORMS": "tpu"},
    ):
        given = dict(env)
        quiet_platform(env)
        assert env == given
    env = {}
    quiet_platform(env)  # this machine: no /dev/accel*, /dev/vfio or GPU device
    assert env == (
        {"JAX_PLATFORMS": "cpu"}
        if not any(Path(d).exists() for d in ("/dev/vfio", "/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd"))
        and not list(Path("/dev").glob("accel*"))
        else {}
    )


# ---- two hosts and a bucket --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bucket(tmp_path_factory):
    from gcs_emulator import gcs_emulator

    with gcs_emulator(tmp_path_factory.mktemp("gcs") / "data") as env:
        yield env


def _hosts(root: Path, driver: str = "") -> Path:
    """An interpreter for `run.sh --python` that makes each process a host of its own: home (its working
    directory), temporary and cache directories under root/host<process id>; one CPU device each. `driver`: a
    script that runs first and is handed `-m dontstop_jax ARGS`."""
    script = root / f"host-python{'-' + Path(driver).stem if driver else ''}"
    interpreter = shlex.join([sys.executable] + ([driver] if driver else []))
    script.write_text(f"""#!/bin/sh
h={shlex.quote(str(root))}/host$DONTSTOP_PROCESS_ID
mkdir -p "$h/home" "$h/tmp" "$h/cache" && cd "$h/home" || exit 1
HOME="$h/home" TMPDIR="$h/tmp" DONTSTOP_CACHE="$h/cache" exec {interpreter} "$@"
""")
    script.chmod(0o755)
    return script


def _launch(root: Path, logs: str, *argv: str, driver: str = "") -> list[str]:
    return [
        "bash",
        LAUNCH,
        "local",
        "--processes",
        "2",
        "--devices",
        "1",
        "--python",
        str(_hosts(root, driver)),
        "--log-dir",
        str(root / logs),
        *argv,
    ]


# Process 1's first checkpoint read fails once (a bucket's transient error, inside Orbax's restore, so the
# restore's closing barrier is met as after a real failure); every process logs each step it reads.
_READ_FAILS_ONCE = """
import os, runpy, sys
import orbax.checkpoint as ocp
from dontstop_jax.engine import checkpoint

restore, attempt, fail = ocp.CheckpointManager.restore, checkpoint.Checkpointer._attempt, [os.environ.get(
    "DONTSTOP_PROCESS_ID") == "1"]  # (a preparation worker re-imports this file, without the variable)

def failing_once(self, step, *args, **kwargs):
    if fail[0]:
        fail[0] = False
        print(f"injected: reading step {step} of {self.directory} fails", file=sys.stderr, flush=True)
        raise OSError("503 Service Unavailable (injected)")
    return restore(self, step, *args, **kwargs)

def logged(self, read, step):
    value, err = attempt(self, read, step)
    print(f"{'read' if err is None else 'could not read'} step {step} of {self.directory}", file=sys.stderr,
          flush=True)
    return value, err

ocp.CheckpointManager.restore, checkpoint.Checkpointer._attempt = failing_once, logged
if __name__ == "__main__" and sys.argv[1:3] == ["-m", "dontstop_jax"]:
    sys.argv = ["dontstop", *sys.argv[3:]]
    runpy.run_module("dontstop_jax", run_name="__main__", alter_sys=True)
elif __name__ == "__main__":  # run.sh's own use of the interpreter (a free port)
    os.execv(sys.executable, [sys.executable, *sys.argv[1:]])
"""


def _reads(log: Path) -> list[str]:
    return [
        line
        for line in log.read_text().splitlines()
        if " step " in line and line.startswith(("read ", "could not read ", "injected: "))
    ]


def _last_lines(log_dir: Path) -> list[str]:
    return [(log_dir / f"process-{i}.log").read_text().strip().splitlines()[-1] for i in range(2)]


def _grid_argv(workdir: str, xla: Path) -> list[str]:
    return [
        "demo",
        "--scale",
        "tiny",
        f"--config.workdir={workdir}",
        "--config.synthetic.directory=benchmark",
        f"--config.variants={list(VARIANTS)}",
        f"--config.seeds={list(SEEDS)}",  # 3 of the demo's phases
        "--compilation-cache",
        str(xla),
    ]  # each host generates the benchmark in its home


@pytest.fixture(scope="module")
def grid_on_one_process(tiny_grid, tmp_path_factory) -> Path:
    """The reference: the same rows on one process with 2 devices (the two hosts' mesh); its grid workdir."""
    root = tmp_path_factory.mktemp("one-process")
    out = subprocess.run(
        [sys.executable, "-m", "dontstop_jax", *_grid_argv(str(root / "grid"), tiny_grid[0] / "xla")],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=1800,
        env={**os.environ, "DONTSTOP_LOCAL_DEVICES": "2"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return root / "grid"


@pytest.fixture(scope="module")
def grid_on_two_hosts(bucket, tiny_grid, tmp_path_factory):
    """The tiny demo on 2 hosts in gs://bkt/grid, stopped by SIGTERM as the base model's phase hands over to the
    next one, then rerun to the end: (root, the interrupted run's exit status and last lines, the rerun's)."""
    from dontstop_jax import files

    reference, _ = tiny_grid
    root = tmp_path_factory.mktemp("two-hosts")
    argv = _grid_argv("gs://bkt/grid", reference / "xla")
    proc = subprocess.Popen(
        _launch(root, "stopped", *argv), cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    pretrain, deadline = files.path("gs://bkt/grid/pretrain"), time.monotonic() + 900
    while not (pretrain.exists() and any((p / "DONE.json").exists() for p in pretrain.iterdir())):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the base phase did not finish in 15 minutes"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)  # forwarded to both processes, between the base phase and the next
    _, err = proc.communicate(timeout=600)
    stopped = (proc.returncode, _last_lines(root / "stopped"), err)
    driver = root / "read-fails-once.py"
    driver.write_text(_READ_FAILS_ONCE)
    rerun = subprocess.run(
        _launch(root, "rerun", *argv, driver=str(driver)), cwd=root, capture_output=True, text=True, timeout=1800
    )
    return root, stopped, rerun


@needs_bucket
@pytest.mark.slow
def test_grid_stopped_at_a_hand_over_and_rerun_equals_one_process(grid_on_two_hosts, grid_on_one_process):
    from dontstop_jax import files

    root, (code, last, err), rerun = grid_on_two_hosts
    assert code == 75, err[-3000:]
    assert all(line.startswith("interrupted at step ") and line.endswith(STOPPED) for line in last), last
    assert last[0] == last[1]  # both stopped at the same step of the same phase
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "interrupted at step" not in rerun.stderr
    one = json.loads((grid_on_one_process / "records.json").read_text())
    two = files.read_json("gs://bkt/grid/records.json")
    assert len(two["records"]) == len(VARIANTS) * len(SEEDS)
    assert _without_timings(two) == _without_timings(one)  # the reference scores and each fine-tune's scores
    for kind, count in (("pretrain", 3), ("finetune", len(VARIANTS) * len(SEEDS))):  # each phase's summary, curve
        ours, theirs = _phases(f"gs://bkt/grid/{kind}"), _phases(grid_on_one_process / kind)
        assert len(ours) == count and sorted(ours) == sorted(theirs)
        for name in ours:
            _assert_close(ours[name], theirs[name], f"{kind}/{name}")
    assert _prepared("gs://bkt/grid/cache") == _prepared(grid_on_one_process / "cache")  # the corpora, to the byte
    for i in range(2):  # each host wrote only its cache, its temporary files and the benchmark it generated
        assert sorted(p.name for p in (root / f"host{i}" / "home").iterdir()) == ["benchmark"]
    # the rerun's first checkpoint read failed once on process 1: both processes read the same steps all along
    reads = [_reads(root / "rerun" / f"process-{i}.log") for i in range(2)]
    assert reads[1][0].startswith("injected: ") and not any(r.startswith("injected: ") for r in reads[0]), reads
    assert reads[0] == reads[1][1:] and reads[0] and all(r.startswith("read step ") for r in reads[0]), reads


def _phases(root) -> dict[str, list]:
    """{label: [summary, *logged metrics]} of each finished phase under root (a grid's pretrain/ or finetune/),
    timings left out and paths reduced to the phase's label (and step)."""
    from dontstop_jax import files

    def label(value):
        return (
            re.sub(r"^(checkpoint:)?.*/([^/]+)-[0-9a-f]{10}(/checkpoints)?", r"\2", value)
            if isinstance(value, str)
            else value
        )

    phases = {}
    for workdir in files.path(root).iterdir():
        done = json.loads((workdir / "DONE.json").read_text())
        metrics = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
        phases[label(str(workdir))] = [
            {k: label(v) for k, v in _without_timings(row).items() if k != "tokens_per_s"} for row in (done, *metrics)
        ]
    return phases


def _assert_close(ours, theirs, where: str) -> None:
    """Equal JSON trees, floats to 1e-5 (2 processes' gradient sums vs one process's over the same 2 devices)."""
    if isinstance(ours, dict) and isinstance(theirs, dict):
        assert sorted(ours) == sorted(theirs), where
        for key in ours:
            _assert_close(ours[key], theirs[key], f"{where}.{key}")
    elif isinstance(ours, list) and isinstance(theirs, list):
        assert len(ours) == len(theirs), where
        for i, (a, b) in enumerate(zip(ours, theirs)):
            _assert_close(a, b, f"{where}[{i}]")
    elif isinstance(ours, float) and isinstance(theirs, float):
        assert ours == pytest.approx(theirs, rel=1e-5, abs=1e-7), (where, ours, theirs)
    else:
        assert ours == theirs, (where, ours, theirs)


def _prepared(cache) -> dict[str, tuple]:
    """{sources: (manifest, {file: sha256})} of each prepared corpus under `cache`; the manifest without the
    input's fingerprint (it hashes the paths and times of the files that a host read)."""
    from dontstop_jax import files

    corpora = {}
    for directory in files.path(cache).iterdir():
        manifest = json.loads((directory / "manifest.json").read_text())
        del manifest["input_fingerprint"]
        corpora[json.dumps(manifest["sources"])] = (
            manifest,
            {
                name: hashlib.sha256(path.read_bytes()).hexdigest()
                for name, path in files.walk(directory).items()
                if name != "manifest.json"
            },
        )
    assert corpora
    return corpora


def _phase(workdir: str, name: str) -> str:
    """The workdir of the grid's phase `name` (its directory is `name-<fingerprint>`)."""
    from dontstop_jax import files

    found = [str(p) for p in files.path(workdir).iterdir() if p.name.rsplit("-", 1)[0] == name]
    assert len(found) == 1, (workdir, name, found)
    return found[0]


@needs_bucket
@pytest.mark.slow
def test_export_on_two_hosts_equals_one_process(grid_on_two_hosts, grid_on_one_process):
    """A fine-tune of the two-host grid, exported by 2 processes into the bucket, holds the weights the one-process
    grid's same fine-tune exports."""
    from safetensors.numpy import load

    from dontstop_jax import files

    root, _, rerun = grid_on_two_hosts
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    phase = "bio_topic-dapt_tapt-s0"
    out = subprocess.run(
        _launch(
            root, "export", "export", "--from", _phase("gs://bkt/grid/finetune", phase), "--to", "gs://bkt/exported"
        ),
        cwd=root,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    ours = load(files.path("gs://bkt/exported/model.safetensors").read_bytes())
    reference = _phase(str(grid_on_one_process / "finetune"), phase)
    subprocess.run(
        [sys.executable, "-m", "dontstop_jax", "export", "--from", reference, "--to", str(root / "one")],
        check=True,
        capture_output=True,
        timeout=600,
    )
    theirs = load((root / "one" / "model.safetensors").read_bytes())
    assert sorted(ours) == sorted(theirs)
    for name in ours:
        np.testing.assert_allclose(ours[name], theirs[name], rtol=1e-5, atol=1e-5, err_msg=name)  # 2 processes vs 1


def _on_one_process(grid: Path, *argv: str) -> subprocess.CompletedProcess:
    """`dontstop ARGV` on one process with the 2 hosts' devices, next to the reference grid (its benchmark)."""
    out = subprocess.run(
        [sys.executable, "-m", "dontstop_jax", *argv],
        cwd=grid.parent,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "DONTSTOP_LOCAL_DEVICES": "2"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def _on_two_hosts(root: Path, logs: str, *argv: str) -> None:
    out = subprocess.run(_launch(root, logs, *argv), cwd=root, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]


@needs_bucket
@pytest.mark.slow
def test_prepare_on_two_hosts_equals_one_process(grid_on_two_hosts, grid_on_one_process):
    """`dontstop prepare` of the grid's DAPT corpus by 2 hosts into a new cache in the bucket (each host encodes its
    share) writes the corpus the one-process grid prepared, to the byte."""
    root, _, rerun = grid_on_two_hosts
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    _on_two_hosts(
        root,
        "prepare",
        "prepare",
        "--config",
        str(ROOT / "configs/dapt.py:biomed"),
        f"--config.init={_phase('gs://bkt/grid/pretrain', 'base')}",
        "--config.data.max_seq_length=64",
        "--config.data.sources=['benchmark/domains/bio/corpus.txt']",
        "--config.data.cache_dir=gs://bkt/prepared",
    )
    ours = _prepared("gs://bkt/prepared")
    assert len(ours) == 1
    assert ours.items() <= _prepared(grid_on_one_process / "cache").items()


def _select_argv(workdir: str) -> list[str]:
    return [
        "select",
        "--config",
        str(ROOT / "configs/select.py:knn"),
        f"--config.workdir={workdir}",
        "--config.task.path=benchmark/tasks/bio_topic",
        "--config.sources=['benchmark/domains/bio/corpus.txt']",
        "--config.embedding.kind=tfidf",
        "--config.embedding.dim=1024",
        "--config.k=3",
    ]


@needs_bucket
@pytest.mark.slow
def test_select_on_two_hosts_equals_one_process(grid_on_two_hosts, grid_on_one_process):
    """kNN selection from the benchmark's domain corpus for its task: 2 hosts with the workdir in the bucket (process 0
    selects, the other waits) write the documents and statistics one process does."""
    from dontstop_jax import files
    from dontstop_jax.phases.select import STATS, selected_corpus

    root, _, _ = grid_on_two_hosts
    _on_two_hosts(root, "select", *_select_argv("gs://bkt/select"))
    _on_one_process(grid_on_one_process, *_select_argv(str(root / "select-one")))
    assert (
        files.path(selected_corpus("gs://bkt/select")).read_bytes()
        == Path(selected_corpus(root / "select-one")).read_bytes()
    )
    ours, theirs = files.read_json(f"gs://bkt/select/{STATS}"), json.loads((root / "select-one" / STATS).read_text())
    assert ours.pop("corpus") == "gs://bkt/select/selected.jsonl"  # the statistics name the corpus they wrote
    assert theirs.pop("corpus") == str(root / "select-one" / "selected.jsonl")
    assert ours["size"] > 0 and _without_timings(ours) == _without_timings(theirs)


def _untimed(text: str) -> str:
    """`text` with each duration (the results table's seconds per epoch) left out."""
    return re.sub(r"[0-9.]+ s/epoch", "s/epoch", text)


def _analyze_argv(grid: str, out: str) -> list[str]:
    return [
        "analyze",
        "--config",
        str(ROOT / "configs/analyze.py:synthetic-tiny"),
        f"--config.grid_dir={grid}",
        f"--config.out_dir={out}",
        "--config.synthetic.directory=benchmark",
        f"--config.mlm.cache_dir={out}-cache",
    ]


@needs_bucket
@pytest.mark.slow
def test_analyze_on_two_hosts_equals_one_process(grid_on_two_hosts, grid_on_one_process):
    """The analysis of the two-host grid by 2 hosts into the bucket (vocabulary overlap, each pretraining phase's MLM
    loss on held-out text, curves, results) has the tables and summary of the one-process grid's analysis."""
    import csv
    import io

    from dontstop_jax import files

    root, _, rerun = grid_on_two_hosts
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    _on_two_hosts(root, "analyze", *_analyze_argv("gs://bkt/grid", "gs://bkt/analysis"))
    _on_one_process(grid_on_one_process, *_analyze_argv(str(grid_on_one_process), str(root / "analysis-one")))
    ours, theirs = files.walk("gs://bkt/analysis"), files.walk(root / "analysis-one")
    assert sorted(ours) == sorted(theirs) and {"summary.md", "mlm_loss.csv", "vocab_overlap.csv"} <= set(ours)
    for name in ("summary.md", "vocab_overlap.csv"):  # the summary: MLM losses to 3 decimals, the grid's table
        assert _untimed(ours[name].read_text()) == _untimed(theirs[name].read_text()), name
    ours, theirs = (
        [
            {k: float(v) if k.startswith("mlm_") else v for k, v in row.items()}
            for row in csv.DictReader(io.StringIO(p["mlm_loss.csv"].read_text()))
        ]
        for p in (ours, theirs)
    )
    assert len(ours) >= 3 * 2  # each pretraining phase on each held-out corpus
    _assert_close(ours, theirs, "mlm_loss.csv")


@needs_bucket
@pytest.mark.slow
def test_continual_on_two_hosts_equals_one_process(bucket, continual_reference, compilation_cache, tmp_path):
    """The session's tiny DAS sequence over two domains (conftest.py; its importance files hand over from stage
    to stage) on 2 hosts in the bucket gives the one-process table."""
    from dontstop_jax import files

    argv, reference = continual_reference
    two = subprocess.run(
        _launch(tmp_path, "continual", *argv, "--config.workdir=gs://bkt/continual")
        + ["--config.synthetic.directory=benchmark", "--compilation-cache", str(compilation_cache)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=1200,
    )  # each host generates the benchmark in its home
    assert two.returncode == 0, two.stderr[-3000:]
    assert _without_timings(files.read_json("gs://bkt/continual/continual.json")) == _without_timings(reference)
