"""Everything in a bucket: docs/get-started/first-run.md (HF directory -> DAPT -> TAPT -> fine-tune -> export) with
every path on gs://, against a local GCS emulator; and the storage layer's contracts one by one."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from gcs_emulator import gcs_emulator, upload_tree
from tiny_hf import WORDS, save_tiny_roberta, write_biomed_data

# Not imported here: gcsfs reads its settings from the environment the emulator fixture sets.
pytestmark = [
    pytest.mark.skipif(
        not (importlib.util.find_spec("gcsfs") and importlib.util.find_spec("gcp_storage_emulator")),
        reason="needs gcsfs and gcp-storage-emulator (the test extra)",
    ),
    pytest.mark.fast_compile_commands,  # tiny runs: compile-bound (conftest.py)
]
ROOT = Path(__file__).parents[1]
SMALL = ["--config.train.batch_size=16", "--config.data.max_seq_length=64"]
STEPS = 100  # of the two-host run


@pytest.fixture(scope="module")
def bucket(tmp_path_factory):
    with gcs_emulator(tmp_path_factory.mktemp("gcs") / "data") as env:
        yield env


def _cli(*args: str, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    out = subprocess.run(
        [sys.executable, "-m", "dontstop_jax", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, **env},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def _local_inputs(root: Path, tokenizer_dir: str) -> None:
    """A tiny transformers RoBERTa with its tokenizer, a gzipped JSON-lines corpus and a labeled task."""
    pytest.importorskip("transformers")
    pytest.importorskip("torch")
    save_tiny_roberta(root / "roberta-tiny", tokenizer_dir)
    write_biomed_data(root / "corpus", root / "task", corpus_docs=400)


@pytest.mark.slow
def test_dapt_tapt_finetune_export_with_every_path_in_the_bucket(bucket, tmp_path, tiny_tokenizer_dir):
    """Inputs, prepared-data cache, workdirs (checkpoints, logs, markers) and the export all live in gs://bkt;
    the local disk holds only this host's cache (DONTSTOP_CACHE) and the session's compilation cache."""
    from export_check import assert_transformers_logits_match

    from dontstop_jax import files

    inputs = tmp_path / "inputs"
    inputs.mkdir()
    _local_inputs(inputs, tiny_tokenizer_dir)
    upload_tree(inputs, "gs://bkt/in")
    work = tmp_path / "work"
    work.mkdir()
    env = {**bucket, files.CACHE_ENV: str(tmp_path / "host-cache")}
    cfg, gs = str(ROOT / "configs"), "gs://bkt"
    cache = f"--config.data.cache_dir={gs}/cache"
    _cli(
        "pretrain",
        "--config",
        f"{cfg}/dapt.py:biomed",
        f"--config.init={gs}/in/roberta-tiny",
        f"--config.data.sources=['{gs}/in/corpus/*.jsonl.gz']",
        f"--config.workdir={gs}/runs/dapt",
        "--config.train.steps=12",
        "--config.train.accum_steps=2",
        "--config.checkpoint.every=6",
        cache,
        *SMALL,
        cwd=work,
        env=env,
    )
    _cli(
        "pretrain",
        "--config",
        f"{cfg}/tapt.py:chemprot",
        f"--config.init={gs}/runs/dapt",
        f"--config.data.sources=['{gs}/in/task/train.jsonl']",
        f"--config.workdir={gs}/runs/tapt",
        "--config.train.epochs=2",
        cache,
        *SMALL,
        cwd=work,
        env=env,
    )
    _cli(
        "finetune",
        "--config",
        f"{cfg}/finetune.py:chemprot",
        f"--config.init={gs}/runs/tapt",
        f"--config.task.path={gs}/in/task",
        f"--config.workdir={gs}/runs/ft",
        "--config.train.epochs=2",
        *SMALL,
        cwd=work,
        env=env,
    )
    _cli("export", "--from", f"{gs}/runs/ft", "--to", f"{gs}/exported", cwd=work, env=env)

    bkt = files.path(gs)
    for phase in ("dapt", "tapt", "ft"):
        for name in ("DONE.json", "phase_config.json", "metrics.jsonl"):
            assert (bkt / "runs" / phase / name).exists(), (phase, name)
        assert list((bkt / "runs" / phase / "tensorboard").glob("events.out.tfevents.*"))
        assert not (bkt / "runs" / phase / ".lock").exists()
    dapt = files.read_json(f"{gs}/runs/dapt/DONE.json")
    assert dapt["parent"] == f"hf:{gs}/in/roberta-tiny" and dapt["workdir"] == f"{gs}/runs/dapt"
    assert files.read_json(f"{gs}/runs/tapt/DONE.json")["parent"].startswith(f"checkpoint:{gs}/runs/dapt/checkpoints@")
    lines = [json.loads(x) for x in (bkt / "runs" / "dapt" / "metrics.jsonl").read_text().splitlines()]
    assert max(x["step"] for x in lines) == 12
    manifests = list(files.walk(f"{gs}/cache"))
    assert sum(m.endswith("manifest.json") for m in manifests) == 2  # DAPT's corpus and TAPT's task text
    assert_transformers_logits_match(files.path(f"{gs}/runs/ft"), files.localize(f"{gs}/exported"))
    # Nothing but caches on the local disk: the working directory is empty.
    assert list(work.iterdir()) == []


def _host_env(scratch: Path, bucket: dict) -> dict:
    """A host that shares nothing with the others: its own home, temporary and cache directories."""
    for name in ("home", "tmp", "cache"):
        (scratch / name).mkdir(parents=True, exist_ok=True)
    from dontstop_jax.files import CACHE_ENV

    return {
        **os.environ,
        **bucket,
        "HOME": str(scratch / "home"),
        "TMPDIR": str(scratch / "tmp"),
        CACHE_ENV: str(scratch / "cache"),
        "DONTSTOP_COMPILATION_CACHE": str(scratch / "cache" / "xla"),
        "DONTSTOP_LOCAL_DEVICES": "1",
    }


def _files_outside_cache(scratch: Path) -> list[str]:
    return sorted(
        str(p.relative_to(scratch))
        for p in scratch.rglob("*")
        if p.is_file() and p.relative_to(scratch).parts[0] != "cache"
    )


@pytest.mark.slow
def test_two_hosts_share_only_the_bucket(bucket, tmp_path, tiny_tokenizer_dir):
    """Two processes with separate disks prepare (each its share, into the bucket, read there in place), pretrain
    with checkpoints in the bucket, are stopped by SIGTERM, and one process (with both hosts' devices) resumes them
    to the end and exports: the same model as an uninterrupted run, and each process wrote nothing outside its own
    cache."""
    import signal
    import socket
    import time

    import jax
    import tiny_pretrain

    from dontstop_jax import files
    from dontstop_jax.engine.checkpoint import Checkpointer

    upload_tree(tiny_pretrain.write_corpus(tmp_path), "gs://bkt/two/corpus.txt")
    upload_tree(Path(tiny_tokenizer_dir), "gs://bkt/two/tokenizer")

    def command(workdir: str, scratch: Path) -> list[str]:
        argv = tiny_pretrain.command(
            workdir,
            "gs://bkt/two/corpus.txt",
            "gs://bkt/two/tokenizer",
            scratch / "cache",
            STEPS,
            {"data.cache_dir": "gs://bkt/two/prepared", "checkpoint.every": 10},
        )
        return [str(ROOT / a) if a.startswith("configs/") else a for a in argv]  # run from the host's home

    hosts = [tmp_path / f"host{i}" for i in range(2)]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [
        subprocess.Popen(
            command("gs://bkt/two/run", host),
            cwd=host / "home",
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env={
                **_host_env(host, bucket),
                "DONTSTOP_COORDINATOR": f"127.0.0.1:{port}",
                "DONTSTOP_NUM_PROCESSES": "2",
                "DONTSTOP_PROCESS_ID": str(i),
            },
        )
        for i, host in enumerate(hosts)
    ]
    checkpoints = files.path("gs://bkt/two/run/checkpoints")
    deadline = time.monotonic() + 600
    while not (checkpoints.exists() and any(p.name.isdigit() for p in checkpoints.iterdir())):
        assert all(p.poll() is None for p in procs), [p.communicate()[1][-2000:] for p in procs]
        assert time.monotonic() < deadline, "no checkpoint after 10 minutes"
        time.sleep(0.5)
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    errs = [proc.communicate(timeout=300)[1] for proc in procs]
    assert [p.returncode for p in procs] == [75, 75], [e[-2000:] for e in errs]
    assert "rerun the same command to continue" in errs[0]
    stopped = Checkpointer("gs://bkt/two/run/checkpoints", read_only=True).latest_step()
    assert stopped is not None and 0 < stopped < STEPS and not files.path("gs://bkt/two/run/DONE.json").exists()
    # Both processes built the corpus in the bucket and read it there: no host holds a copy of its shards.
    assert not [p for host in hosts for p in (host / "cache").rglob("shard-*.npy")]

    def one_host(*args: str, host: Path) -> None:
        # one process holding both hosts' devices: the same batch split, so the same dropout (engine/steps.py)
        out = subprocess.run(
            list(args),
            cwd=host / "home",
            capture_output=True,
            text=True,
            timeout=600,
            env={**_host_env(host, bucket), "DONTSTOP_LOCAL_DEVICES": "2"},
        )
        assert out.returncode == 0, out.stderr[-3000:]

    one_host(*command("gs://bkt/two/run", hosts[0]), host=hosts[0])  # resumed on one process
    assert files.read_json("gs://bkt/two/run/DONE.json")["steps"] == STEPS
    reference = tmp_path / "reference-host"
    one_host(*command("gs://bkt/two/reference", reference), host=reference)
    resumed = Checkpointer("gs://bkt/two/run/checkpoints", read_only=True).restore_params()
    uninterrupted = Checkpointer("gs://bkt/two/reference/checkpoints", read_only=True).restore_params()
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), resumed, uninterrupted)
    one_host(
        sys.executable,
        "-m",
        "dontstop_jax",
        "export",
        "--from",
        "gs://bkt/two/run",
        "--to",
        "gs://bkt/two/exported",
        host=hosts[1],
    )
    assert files.path("gs://bkt/two/exported/config.json").exists()
    assert files.path("gs://bkt/two/exported/model.safetensors").exists()
    for host in hosts:
        assert _files_outside_cache(host) == [], host


def test_small_contracts_in_the_bucket(bucket, tmp_path):
    """What the flows above rely on, one by one: a published directory replaces the old one whole with its marker
    last; a file copied for local reading is fetched again only when it changed; the workdir lock is refused
    while held; `plan` reads a bucket model's config.json without its weights."""
    from dontstop_jax import files
    from dontstop_jax.analysis.plan import model_config
    from dontstop_jax.config_loader import load
    from dontstop_jax.errors import UserError
    from dontstop_jax.train.workdir import LEASE_SECONDS, LOCK, _acquire, _release

    for version, names in ((1, ["a", "b", "config.json"]), (2, ["b", "config.json"])):
        with files.publishing("gs://bkt/small/dir", last="config.json") as tmp:
            tmp.mkdir()
            for name in names:
                (tmp / name).write_text(f"{name}{version}")
    assert {k: v.read_text() for k, v in files.walk("gs://bkt/small/dir").items()} == {
        "b": "b2",
        "config.json": "config.json2",
    }

    files.write_text("gs://bkt/small/file.txt", "one")
    first = files.localize("gs://bkt/small/file.txt")
    assert first.read_text() == "one" and files.localize("gs://bkt/small/file.txt") == first
    files.write_text("gs://bkt/small/file.txt", "two, longer")
    assert files.localize("gs://bkt/small/file.txt").read_text() == "two, longer"

    lock = files.path("gs://bkt/small/workdir") / LOCK
    _acquire(lock)
    held = {**files.read_json(lock), "host": "another-host"}
    files.write_json(lock, held)  # held by a run on another host that renewed it just now
    with pytest.raises(UserError, match="is in use by another run"):
        _acquire(lock)
    files.write_json(lock, {**held, "beat": held["beat"] - LEASE_SECONDS - 1})  # that host died (preempted VM)
    _acquire(lock)
    assert files.read_json(lock)["host"] != "another-host"
    _release(lock)
    assert not lock.exists()

    from dontstop_jax.train import MetricsWriter

    with MetricsWriter("gs://bkt/small/run", sync_every_s=0) as writer:  # every write queues an upload
        for step in (1, 2, 3):
            writer.write(step, {"loss": 1.0 / step})
    uploaded = files.path("gs://bkt/small/run/metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in uploaded] == [1, 2, 3]  # close waited for the last upload
    assert list(files.path("gs://bkt/small/run/tensorboard").glob("events.out.tfevents.*"))

    files.write_json(
        "gs://bkt/small/model/config.json",
        {
            "model_type": "roberta",
            "vocab_size": 97,
            "hidden_size": 48,
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
            "intermediate_size": 96,
            "max_position_embeddings": 66,
        },
    )
    cfg = load("configs/tapt.py", ["--config.init=gs://bkt/small/model"])
    assert (model_config(cfg).hidden_size, model_config(cfg).num_hidden_layers) == (48, 3)


def test_a_corpus_prepared_in_the_bucket_is_read_in_place(bucket, tmp_path, tiny_tokenizer_dir, monkeypatch):
    """Built from a compressed file in the bucket straight into the bucket, read there a few rows at a time: the
    same blocks as a local build, and nothing in this host's cache."""
    import gzip

    from dontstop_jax import files
    from dontstop_jax.data import prepare

    monkeypatch.setenv(files.CACHE_ENV, str(tmp_path / "host-cache"))
    monkeypatch.setattr(prepare, "UNIT_LINES", 50)
    docs = [f"document {i} of the bucket corpus, hello world" for i in range(400)]
    (tmp_path / "in.jsonl.gz").write_bytes(
        gzip.compress("".join(json.dumps({"text": d}) + "\n" for d in docs).encode())
    )
    upload_tree(tmp_path / "in.jsonl.gz", "gs://bkt/prep/in.jsonl.gz")
    local = prepare.prepare_corpus(
        [str(tmp_path / "in.jsonl.gz")], tiny_tokenizer_dir, tmp_path / "local", max_seq_length=16, shard_blocks=50
    )
    remote = prepare.prepare_corpus(
        ["gs://bkt/prep/in.jsonl.gz"], tiny_tokenizer_dir, "gs://bkt/prep/cache", max_seq_length=16, shard_blocks=50
    )
    assert isinstance(remote.shards, prepare.BucketShards) and remote.num_blocks == local.num_blocks > 100
    order = np.random.default_rng(0).permutation(local.num_blocks)
    np.testing.assert_array_equal(remote.blocks(order), local.blocks(order))
    assert sorted(files.walk(f"gs://bkt/prep/cache/{remote.directory.name}")) == sorted(
        p.name for p in local.directory.iterdir()
    )  # shards and manifest; pieces and shares are gone
    assert not list((tmp_path / "host-cache").rglob("*.npy"))
    again = prepare.prepare_corpus(
        ["gs://bkt/prep/in.jsonl.gz"], tiny_tokenizer_dir, "gs://bkt/prep/cache", max_seq_length=16, shard_blocks=50
    )
    np.testing.assert_array_equal(again.blocks(order[:20]), local.blocks(order[:20]))


def test_select_reads_and_writes_the_bucket_like_a_local_disk(bucket, tmp_path):
    """kNN selection with its task, corpus and workdir in the bucket picks what it picks from local files."""
    from dontstop_jax import files
    from dontstop_jax.phases.defaults import select_config
    from dontstop_jax.phases.select import select, selected_corpus

    rng = np.random.default_rng(0)
    topics = [WORDS[:6], ["graph", "node", "edge", "compiler", "kernel", "cache"]]
    local = tmp_path / "local"
    (local / "task").mkdir(parents=True)
    for split, n in (("train", 12), ("dev", 6), ("test", 6)):
        (local / "task" / f"{split}.jsonl").write_text(
            "".join(json.dumps({"text": " ".join(rng.choice(topics[0], 10)), "label": i % 2}) + "\n" for i in range(n))
        )
    (local / "corpus.txt").write_text("\n".join(" ".join(rng.choice(topics[i % 2], 20)) for i in range(120)) + "\n")
    upload_tree(local, "gs://bkt/select/in")

    def run(root: str, workdir: str) -> list[str]:
        cfg = select_config()
        cfg.update(dict(method="knn", workdir=workdir, chunk_size=32, checkpoint_every=2, k=3, fit_docs=100))
        cfg.task.path = f"{root}/task"
        cfg.sources = [f"{root}/corpus.txt"]
        cfg.embedding.update(kind="tfidf", dim=256)
        select(cfg)
        rows = [json.loads(line) for line in files.path(selected_corpus(workdir)).read_text().splitlines()]
        assert {r.pop("source") for r in rows} == {f"{root}/corpus.txt"}
        return rows

    in_bucket = run("gs://bkt/select/in", "gs://bkt/select/run")
    assert in_bucket and in_bucket == run(str(local), str(tmp_path / "run"))
    assert files.path("gs://bkt/select/run/DONE.json").exists()


def test_a_held_lock_is_renewed_so_other_hosts_see_the_run_alive(tmp_path, monkeypatch):
    """The lease thread rewrites the lock's `beat` while the run holds it and stops on release."""
    import time

    from dontstop_jax import files
    from dontstop_jax.train import workdir as wd

    monkeypatch.setattr(wd, "RENEW_SECONDS", 0.05)
    lock = tmp_path / wd.LOCK
    lease = wd._Lease(files.path(lock), wd._acquire(files.path(lock)))
    first = files.read_json(lock)["beat"]
    deadline = time.monotonic() + 10
    while files.read_json(lock)["beat"] == first:
        assert time.monotonic() < deadline, "the lock was never renewed"
        time.sleep(0.05)
    lease.stop()
    wd._release(files.path(lock))
    assert not lock.exists()


def test_an_unsupported_url_is_one_line(tmp_path, tiny_tokenizer_dir, capsys):
    import tiny_pretrain

    from dontstop_jax import cli

    argv = tiny_pretrain.command(
        "s3://bkt/run", tiny_pretrain.write_corpus(tmp_path), tiny_tokenizer_dir, tmp_path / "cache", 4
    )
    assert cli.main(argv[3:]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: s3://bkt/run: unsupported URL scheme s3://; use a local path or gs://"


def test_analyze_reads_corpora_from_and_writes_its_report_to_the_bucket(bucket, tmp_path):
    pytest.importorskip("matplotlib")
    import importlib.util as iu

    from dontstop_jax import files
    from dontstop_jax.analysis.report import analyze

    for name, words in (("bio", WORDS[:7]), ("cs", ["graph", "node", "edge", "compiler", "kernel", "cache"])):
        files.write_text(f"gs://bkt/analyze/{name}.txt", "\n".join(" ".join(words) for _ in range(20)) + "\n")
    spec = iu.spec_from_file_location("analyze_cfg", ROOT / "configs" / "analyze.py")
    assert spec is not None and spec.loader is not None
    module = iu.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config("custom")
    cfg.out_dir = "gs://bkt/analyze/report"
    cfg.corpora = {"bio": ["gs://bkt/analyze/bio.txt"], "cs": ["gs://bkt/analyze/*cs.txt"]}
    analyze(cfg)
    report = files.walk("gs://bkt/analyze/report")
    assert sorted(report) == ["summary.md", "vocab_overlap.csv", "vocab_overlap.png"]
    assert "vocab_overlap.png" in report["summary.md"].read_text()
