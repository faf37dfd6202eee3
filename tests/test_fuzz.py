"""Bad inputs and faults against the CLI, as a new user meets them: configs, data, tasks, models and tokenizers,
checkpoints, filesystem faults and concurrency.

Each case asserts the exit status, that stderr ends in exactly one `error:` line (or the run succeeds where that
is the safe outcome) with no traceback, and that every file written before (a finished phase, the prepared
cache, the corpus, the task) is unchanged. Most cases call `cli.main` in this process (the same code path as
the `dontstop` command, without paying for a new JAX process each time); faults that need a process of their
own (file size limits, a read-only mount, two runs at once, signals) run the command as a subprocess.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tiny_pretrain import command, write_corpus

from dontstop_jax import cli

pytestmark = pytest.mark.fast_compile_commands  # tiny runs: compile-bound (conftest.py)

ROOT = Path(__file__).parents[1]
DAPT, FINETUNE = str(ROOT / "configs/dapt.py:biomed"), str(ROOT / "configs/finetune.py:chemprot")
MODEL = {
    "model.vocab_size": 512,
    "model.hidden_size": 32,
    "model.num_hidden_layers": 2,
    "model.num_attention_heads": 4,
    "model.intermediate_size": 64,
    "model.max_position_embeddings": 34,
}


def _unchanged(before: dict[str, str], after: dict[str, str]) -> bool:
    """Every file written before is still there, byte for byte (new files, e.g. compilation cache entries, may
    appear)."""
    return all(after.get(name) == digest for name, digest in before.items())


def _snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "cases" not in p.relative_to(root).parts
    }


class World:
    """A finished 4-step pretraining phase, its prepared cache, a corpus and a task: what a user had before."""

    def __init__(self, root: Path, tokenizer: str):
        self.root, self.tokenizer = root, tokenizer
        self.corpus, self.cache, self.phase = write_corpus(root), root / "cache", root / "phase"
        self.task = root / "task"
        self.task.mkdir()
        for split, n in (("train", 40), ("dev", 16), ("test", 16)):
            rows = [
                {"text": f"protein binds cell {i}" if i % 2 else f"graph node edge {i}", "label": "ab"[i % 2]}
                for i in range(n)
            ]
            (self.task / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        self.case_count = 0

    def case_dir(self) -> Path:
        self.case_count += 1
        path = self.root / "cases" / str(self.case_count)
        path.mkdir(parents=True)
        return path

    def pretrain(self, workdir: Path | None = None, steps: int = 4, **extra) -> list[str]:
        """A `dontstop pretrain` argv for the tiny model (same as tests/tiny_pretrain.py's command)."""
        return command(workdir or self.case_dir() / "w", self.corpus, self.tokenizer, self.cache, steps, extra)[3:]

    def finetune(self, **extra) -> list[str]:
        fields = {
            "init": str(self.phase),
            "task.path": str(self.task),
            "workdir": str(self.case_dir() / "ft"),
            "data.max_seq_length": 32,
            "train.batch_size": 8,
            "train.epochs": 1,
            "mesh.shape": "(-1, 1, 1)",
            **extra,
        }
        return ["finetune", "--config", FINETUNE] + [f"--config.{k}={v}" for k, v in fields.items()]


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_tokenizer_dir):
    w = World(tmp_path_factory.mktemp("fuzz"), tiny_tokenizer_dir)
    assert cli.main(w.pretrain(w.phase)) == 0
    return w


def _main(argv: list[str], capsys) -> tuple[int, str]:
    code = cli.main(argv)
    return code, capsys.readouterr().err


def _one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert lines and "Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], stderr[-3000:]
    return errors[0]


def _write(path: Path, text: str | bytes) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return str(path)


# (case id, argv builder, expected exit code, a phrase the error line must hold); exit 0 = a safe success.
def _cases():
    c = []
    add = lambda name, build, code, phrase: c.append(pytest.param(build, code, phrase, id=name))
    # -- config
    add("type", lambda w: w.pretrain(**{"train.steps": "abc"}), 2, "train.steps must be an int")
    add("section-as-value", lambda w: w.pretrain() + ["--config.train=5"], 2, "train is a section")
    add("typo", lambda w: w.pretrain() + ["--config.train.stpes=5"], 2, "train has no field 'stpes'")
    add("keep-last-0", lambda w: w.pretrain(**{"checkpoint.keep_last": 0}), 2, "checkpoint.keep_last=0 must be >= 1")
    add("negative-lr", lambda w: w.pretrain(**{"optim.learning_rate": -1}), 2, "optim.learning_rate=-1.0 must be > 0")
    add("mask-prob", lambda w: w.pretrain(**{"data.mask_prob": 1.5}), 2, "data.mask_prob=1.5 must be in (0, 1)")
    add("steps-0", lambda w: w.pretrain(steps=0), 2, "train.steps=0 must be > 0")
    add("dtype", lambda w: w.pretrain(**{"model.dtype": "float64"}), 2, "model.dtype='float64' must be one of")
    add("peft-method", lambda w: w.pretrain(**{"peft.method": "prefix"}), 2, "peft.method='prefix' must be one of")
    add("metric", lambda w: w.finetune(**{"train.metric": "f1"}), 2, "train.metric='f1' must be one of")
    add(
        "config-arg",
        lambda w: ["pretrain", "--config", str(ROOT / "configs/dapt.py:nosuch")],
        2,
        "unknown domain 'nosuch'; choose from",
    )
    add("config-missing", lambda w: ["pretrain", "--config", "nowhere/dapt.py"], 2, "does not exist")
    add(
        "config-syntax",
        lambda w: ["pretrain", "--config", _write(w.case_dir() / "c.py", "def get_config(:\n")],
        2,
        "c.py:1:",
    )
    add(
        "config-raises",
        lambda w: ["pretrain", "--config", _write(w.case_dir() / "c.py", "def get_config():\n    return 1 / 0\n")],
        2,
        "c.py:2: ZeroDivisionError",
    )
    add("stray-argument", lambda w: w.pretrain() + ["oops"], 2, "unexpected argument 'oops'")
    add("batch-vs-devices", lambda w: w.pretrain(**{"train.batch_size": 12}), 2, "train.batch_size 12")
    add("batch-vs-accum", lambda w: w.pretrain(**{"train.accum_steps": 3}), 2, "not divisible by train.accum_steps 3")
    # -- data
    add(
        "corpus-missing",
        lambda w: w.pretrain(**{"data.sources": '["/nonexistent/corpus.txt"]'}),
        2,
        "/nonexistent/corpus.txt",
    )
    add("corpus-glob-empty", lambda w: w.pretrain(**{"data.sources": f'["{w.root}/none-*.txt"]'}), 2, "none-*.txt")
    add(
        "corpus-empty",
        lambda w: w.pretrain(**{"data.sources": f'["{_write(w.case_dir() / "e.txt", "")}"]'}),
        2,
        "e.txt",
    )
    add(
        "corpus-bad-jsonl",
        lambda w: w.pretrain(**{"data.sources": f'["{_write(w.case_dir() / "c.jsonl", "{no")}"]'}),
        2,
        "c.jsonl",
    )
    add(
        "corpus-no-text-field",
        lambda w: w.pretrain(**{"data.sources": '["{}"]'.format(_write(w.case_dir() / "c.jsonl", '{"body": "x"}\n'))}),
        2,
        "text",
    )
    add("cache-truncated-shard", lambda w: w.pretrain(**{"data.cache_dir": _damaged_cache(w)}), 0, "")
    add("no-sources", lambda w: w.pretrain(**{"data.sources": "[]"}), 2, "no corpus sources given")
    # -- tasks
    add("task-missing", lambda w: w.finetune(**{"task.path": "/nonexistent/task"}), 2, "/nonexistent/task")
    add("task-no-test", lambda w: w.finetune(**{"task.path": _task(w, drop="test")}), 2, "no test split")
    add("task-bad-line", lambda w: w.finetune(**{"task.path": _task(w, dev="{broken\n")}), 2, "dev.jsonl")
    add("task-no-label", lambda w: w.finetune(**{"task.path": _task(w, train='{"text": "x"}\n')}), 2, "label")
    add(
        "task-unseen-label",
        lambda w: w.finetune(**{"task.path": _task(w, test='{"text": "x", "label": "zz"}\n')}),
        2,
        "label 'zz' in split test does not occur in train",
    )
    # -- models and tokenizers
    add("init-missing", lambda w: w.pretrain(init="/nonexistent/model"), 2, "is neither a Hugging Face directory")
    add("init-empty-dir", lambda w: w.pretrain(init=str(w.case_dir())), 2, "is neither a Hugging Face directory")
    add("init-unfinished", lambda w: w.pretrain(init=_unfinished(w)), 2, "is a phase that has not finished")
    add("tokenizer-missing", lambda w: w.pretrain(tokenizer="/nonexistent/tok"), 2, "/nonexistent/tok has no tokenizer")
    add(
        "tokenizer-over-vocab-scratch",
        lambda w: w.pretrain(**{"model.vocab_size": 100}),
        2,
        "but the model's vocab_size is 100",
    )
    add("tokenizer-over-vocab-phase", lambda w: w.finetune(tokenizer=_big_tokenizer(w)), 2, "vocab_size is 512")
    add(
        "hf-config-garbage",
        lambda w: w.pretrain(init=_hf_dir(w, config="{not json")),
        2,
        "config.json is not valid JSON",
    )
    add(
        "hf-weights-garbage",
        lambda w: w.pretrain(init=_hf_dir(w, weights=b"garbage")),
        2,
        "model.safetensors is not a readable safetensors file",
    )
    add(
        "weights-vs-config",
        lambda w: w.finetune(init=_mismatched_phase(w)),
        2,
        "needs (2, 96); the checkpoint and its config do not belong together",
    )
    add(
        "delta-missing",
        lambda w: w.finetune(init_delta="/nonexistent/peft.safetensors"),
        2,
        "/nonexistent/peft.safetensors",
    )
    add("delta-on-scratch", lambda w: w.pretrain(init_delta=str(w.root / "x.safetensors")), 2, "init_delta needs")
    # -- checkpoints and workdirs
    add("drift", lambda w: w.pretrain(w.phase, steps=5), 2, "train.steps: 4 -> 5")
    add("rerun-finished", lambda w: w.pretrain(w.phase, **{"train.log_every": 1}), 0, "")
    add(
        "export-unfinished",
        lambda w: ["export", "--from", _unfinished(w), "--to", str(w.case_dir() / "x")],
        2,
        "has not finished",
    )
    add(
        "export-missing",
        lambda w: ["export", "--from", "/nonexistent/phase", "--to", str(w.case_dir() / "x")],
        2,
        "--from='/nonexistent/phase' is not a phase workdir",
    )
    add(
        "export-overrides",
        lambda w: ["export", "--from", str(w.phase), "--to", "x", "--config.a=1"],
        2,
        "export takes no --config overrides",
    )
    add(
        "export-peft-of-full",
        lambda w: ["export", "--from", str(w.phase), "--to", str(w.case_dir() / "p"), "--peft-only"],
        2,
        "peft.method=full",
    )
    add(
        "nan-at-huge-lr",
        lambda w: w.pretrain(**{"optim.learning_rate": 1e9, "optim.max_grad_norm": 1e9}),
        2,
        "loss became",
    )
    # -- features added since: prompts, few-shot and train sizes, term lists, topologies, bucket URLs, continual
    add(
        "prompt-template",
        lambda w: w.finetune(head="prompt", **{"prompt.template": "{text} no mask"}),
        2,
        "needs exactly one {text} and one <mask>",
    )
    add(
        "prompt-verbalizer-label",
        lambda w: w.finetune(head="prompt", **{"prompt.verbalizer": "{'a': 'yes'}"}),
        2,
        "verbalizer",
    )
    add("prompt-verbalizer-type", lambda w: w.finetune(head="prompt", **{"prompt.verbalizer": "yes"}), 2, "verbalizer")
    add("shots-too-many", lambda w: w.finetune(**{"task.shots": 100}), 2, "100 examples per class")
    add("shots-negative", lambda w: w.finetune(**{"task.shots": -1}), 2, "task.shots=-1 must be >= 0")
    add("train-size-too-big", lambda w: w.finetune(**{"task.train_size": 1000}), 2, "a train size of 1000 cannot")
    one_class = "".join(json.dumps({"text": f"cell {i}", "label": "a"}) + "\n" for i in range(8))
    add(
        "task-one-class",
        lambda w: w.finetune(**{"task.path": _task(w, train=one_class, dev=one_class, test=one_class)}),
        2,
        "two classes at least",
    )
    add(
        "terms-missing",
        lambda w: w.pretrain(**{"data.span_masking.terms": "/nonexistent/terms.txt"}),
        2,
        "/nonexistent/terms.txt",
    )
    add("terms-rate", lambda w: w.pretrain(**{"data.span_masking.rate": 2}), 2, "span_masking.rate=2")
    add("topology", lambda w: ["plan", "--config", DAPT, "--topology", "v9-8"], 2, "unknown TPU topology 'v9-8'")
    add(
        "topology-slices",
        lambda w: ["plan", "--config", DAPT, "--topology", "v4-8", "--slices", "0"],
        2,
        "--slices must be >= 1",
    )
    for name, url in (
        ("no-bucket", "gs://"),
        ("empty-bucket", "gs:///x"),
        ("space", "gs://my bucket/x"),
        ("one-slash", "gs:/bkt/x"),
        ("double-slash", "gs://bkt//x"),
        ("newline", "gs://bkt/x\n"),
    ):
        add(f"url-{name}-workdir", lambda w, url=url: w.pretrain(workdir=url), 2, "is not a bucket URL")
        add(
            f"url-{name}-source",
            lambda w, url=url: w.pretrain(**{"data.sources": json.dumps([url])}),
            2,
            "is not a bucket URL",
        )
    add("url-export", lambda w: ["export", "--from", str(w.phase), "--to", "gs://"], 2, "--to='gs://' is not a bucket")
    for name, field, value, phrase in (
        ("method", "methods", "['nope']", "unknown continual methods ['nope']"),
        ("no-methods", "methods", "[]", "methods=[] must list distinct names"),
        ("method-twice", "methods", "['das','das']", "must list distinct names"),
        ("sequence", "sequence", "['mars']", "sequence names domains ['mars']"),
        ("contrast", "das.contrast", "none", "das.contrast='none' must be one of"),
        ("ewc-lam", "ewc.lam", "-1", "ewc.lam=-1.0 must be >= 0"),
        ("derpp-buffer", "derpp.buffer_size", "0", "derpp.buffer_size=0 must be >= 1"),
        ("hat-s-max", "hat.s_max", "0", "hat.s_max=0.0 must be >= 1"),
    ):
        add(f"continual-{name}", lambda w, f=field, v=value: _continual(w, f"--config.{f}={v}"), 2, phrase)
    return c


def _continual(w: World, *overrides: str) -> list[str]:
    return [
        "continual",
        "--config",
        str(ROOT / "configs/continual.py:tiny"),
        f"--config.workdir={w.case_dir()}",
        f"--config.synthetic.directory={w.root / 'continual-bench'}",
        *overrides,
    ]


def _task(w: World, drop: str | None = None, **replace: str) -> str:
    path = w.case_dir() / "task"
    shutil.copytree(w.task, path)
    if drop:
        (path / f"{drop}.jsonl").unlink()
    for split, text in replace.items():
        (path / f"{split}.jsonl").write_text(text)
    return str(path)


def _damaged_cache(w: World) -> str:
    """A copy of the world's prepared cache with a shard cut short (as a full disk leaves it): rebuilt, not used."""
    path = w.case_dir() / "cache"
    shutil.copytree(w.cache, path, ignore=shutil.ignore_patterns("xla"))
    shard = next(path.glob("*/shard-*.npy"))
    shard.write_bytes(shard.read_bytes()[:-10])
    return str(path)


def _unfinished(w: World) -> str:
    path = w.case_dir() / "unfinished"
    shutil.copytree(w.phase, path)
    (path / "DONE.json").unlink()
    return str(path)


def _mismatched_phase(w: World) -> str:
    """A copy of the finished phase whose recorded model config says a wider FFN than its weights have."""
    path = Path(_unfinished(w))
    (path / "DONE.json").write_text("{}")
    for meta in path.glob("checkpoints/*/meta/metadata"):
        record = json.loads(meta.read_text())
        record["model_config"]["intermediate_size"] = 96
        meta.write_text(json.dumps(record))
    return str(path)


def _big_tokenizer(w: World) -> str:
    """The world's tokenizer with 600 added tokens: more ids than the phase's 512-row embedding table."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(w.tokenizer)
    tok.add_tokens([f"newword{i}" for i in range(600)])
    path = w.case_dir() / "tok"
    tok.save_pretrained(path)
    return str(path)


def _hf_dir(w: World, config: str | None = None, weights: bytes | None = None) -> str:
    """The finished phase exported as a Hugging Face directory, then damaged."""
    path = w.case_dir() / "hf"
    assert cli.main(["export", "--from", str(w.phase), "--to", str(path)]) == 0
    if config is not None:
        (path / "config.json").write_text(config)
    if weights is not None:
        (path / "model.safetensors").write_bytes(weights)
    return str(path)


@pytest.mark.parametrize("build, code, phrase", _cases())
def test_bad_input(world, capsys, build, code, phrase):
    argv = build(world)
    capsys.readouterr()
    before = _snapshot(world.root)
    got, stderr = _main(argv, capsys)
    assert got == code, stderr[-3000:]
    if code:
        assert phrase in _one_error_line(stderr)
    else:
        assert "Traceback" not in stderr
    assert _unchanged(before, _snapshot(world.root)), "a file written before changed"


# -- faults that need a process of their own ---------------------------------------------------------------------
def _run(
    argv: list[str], cwd: Path, preexec=None, wrap: list[str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    cmd = [*(wrap or []), sys.executable, "-m", "dontstop_jax", *argv]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, preexec_fn=preexec, timeout=timeout)


def _file_size_limit(limit: int):
    def apply():  # a full disk, as far as this process can tell: writes past `limit` bytes fail with EFBIG
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


@pytest.mark.parametrize("limit, where", [(30_000, "cache"), (20_000, "checkpoints")])
def test_disk_full(world, limit, where):
    """Writes fail part-way (file size limit): one line naming the file; rerun with room gives the same phase."""
    case = world.case_dir()
    cache = world.cache if where == "checkpoints" else case / "cache"  # the checkpoint case reuses the cache
    # its own compilation cache: a cache entry cut short must not reach the session's shared one
    argv = [
        *command(case / "w", world.corpus, world.tokenizer, cache, 20)[3:],
        "--compilation-cache",
        str(case / "xla"),
    ]
    before = _snapshot(world.root)
    out = _run(argv, ROOT, preexec=_file_size_limit(limit))
    assert out.returncode == 1, out.stderr[-3000:]
    line = _one_error_line(out.stderr)
    assert line.startswith("error: cannot write ") and where in line and "rerun the same command" in line
    assert _unchanged(before, _snapshot(world.root))
    again = _run(argv, ROOT)
    assert again.returncode == 0, again.stderr[-3000:]


def _read_only(path: Path) -> list[str] | None:
    """`unshare` wrapper that runs a command with `path` mounted read-only (no root needed), or None."""
    probe = subprocess.run(
        [
            "unshare",
            "-rm",
            "sh",
            "-c",
            f"mount --bind {path} {path} && mount -o remount,bind,ro {path} && ! touch {path}/.probe",
        ],
        capture_output=True,
    )
    if probe.returncode:
        return None
    return [
        "unshare",
        "-rm",
        "sh",
        "-c",
        f'mount --bind {path} {path} && mount -o remount,bind,ro {path} && exec "$@"',
        "sh",
    ]


def test_read_only_workdir_and_cache(world):
    case = world.case_dir()
    shutil.copytree(world.phase, case / "w")
    (case / "w" / "DONE.json").unlink()  # an interrupted phase whose workdir became read-only
    wrap = _read_only(case)
    if wrap is None:
        pytest.skip("this machine does not allow unprivileged read-only bind mounts (unshare -rm)")
    before = _snapshot(world.root)
    out = _run(world.pretrain(case / "w"), ROOT, wrap=wrap)
    assert out.returncode == 1 and "read-only file system" in _one_error_line(out.stderr), out.stderr[-3000:]
    cache_case = world.case_dir()
    out = _run(
        command(case / "w2", world.corpus, world.tokenizer, cache_case, 4)[3:], ROOT, wrap=_read_only(cache_case)
    )
    assert out.returncode and "read-only file system" in _one_error_line(out.stderr).lower(), out.stderr[-3000:]
    assert _unchanged(before, _snapshot(world.root))


def test_a_second_run_on_a_busy_workdir_is_refused(world):
    workdir = world.case_dir() / "w"
    first = subprocess.Popen(
        [sys.executable, "-m", "dontstop_jax", *world.pretrain(workdir, steps=400)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 300
        while not (workdir / ".lock").exists() and time.time() < deadline and first.poll() is None:
            time.sleep(0.05)
        second = _run(world.pretrain(workdir, steps=400), ROOT)
        assert second.returncode == 2
        line = _one_error_line(second.stderr)
        assert f"is in use by another run (pid {first.pid} on " in line and "delete" in line
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=300)
    assert first.returncode in (0, 75) and not (workdir / ".lock").exists()  # finished, or stopped


def test_a_stale_lock_of_a_dead_run_is_broken(world, capsys, caplog):
    workdir = world.case_dir() / "w"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _write(
        workdir / ".lock",
        json.dumps({"host": os.uname().nodename, "pid": dead.pid, "start": "1", "since": "yesterday"}),
    )
    code, stderr = _main(world.pretrain(workdir), capsys)
    assert code == 0, stderr[-3000:]
    assert "breaking the stale lock" in caplog.text and (workdir / "DONE.json").exists()
