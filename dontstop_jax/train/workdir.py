"""A phase's workdir contract: the config that made it, its completion marker, and no silent drift.

    WORKDIR/phase_config.json  the full config of the run and its fingerprint, recorded when the phase starts
    WORKDIR/DONE.json          the phase's summary, written last: only a workdir holding it is a finished phase
    WORKDIR/.lock              host, pid and start time of the run working in it (absent when none is), and
                               when it last renewed it (every RENEW_SECONDS; another host's run that stopped
                               renewing for LEASE_SECONDS, e.g. on a preempted VM, is dead)

A rerun with the same config resumes an interrupted phase or returns a finished one's summary. A rerun whose
config differs in anything that shapes the result is refused, naming the fields: resuming under new settings
would mix two runs, and returning the old summary would report settings that never ran. Two runs in one
workdir at once are refused too: the second would resume from the first's checkpoints and lose them when the
first prunes its old steps.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import threading
import time
from pathlib import Path as LocalPath
from typing import Any

from ml_collections import ConfigDict

from dontstop_jax import files
from dontstop_jax.distributed import decide
from dontstop_jax.errors import UserError
from dontstop_jax.files import PathLike, read_json, write_json

log = logging.getLogger(__name__)
DONE, CONFIG, LOCK = "DONE.json", "phase_config.json", ".lock"
PREPARED = "prepared"  # the default prepared-data cache of a phase (data.cache_dir unset): not a result
# Fields (dotted paths, a section stands for all its fields) that never change what a phase produces: its
# name and place, logging, checkpoint cadence, the mesh (any mesh resumes any checkpoint), rematerialisation
# (same math) and where caches live.
RUNTIME_ONLY = ("name", "workdir", "train.log_every", "train.stop_poll_every", "checkpoint", "mesh", "model.remat",
                "data.cache_dir", "checkpoint_every", "train.gather_params_once")
# Fields added after phases were recorded, at the value that does what phases did before them: left out of the
# fingerprint and the drift check at that value, so a phase finished before the field existed is still reused.
NEUTRAL = {"task.train_size": 0, "data.attend_across_documents": True, "train.prune_top_layers": 0,
           "data.span_masking.terms": "", "data.span_masking.rate": 1.0, "das.general": True,
           "das.contrast": "all", "das.random": False, "head": "classifier", "task.shots": 0,
           "train.fresh_head": False, "unit_gates": "", "train.grad_reduce_dtype": "float32"}
# Sections added later that do nothing when their `method` is "none": then none of their fields count.
SWITCHED_SECTIONS = ("regularizer", "averaging", "multitask")
# A continual method's section counts only in the phases whose `objective` is that method.
OBJECTIVE_SECTIONS = ("ewc", "derpp", "hat")
# A fine-tuning head's section counts only in the phases with that `head` (the prompt's template and verbalizer).
HEAD_SECTIONS = ("prompt",)
RENEW_SECONDS, LEASE_SECONDS = 60, 600


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict) and tree:
        return {k: v for key, sub in tree.items() for k, v in _flatten(sub, f"{prefix}{key}.").items()}
    return {prefix[:-1]: tree}


def _runtime_only(field: str) -> bool:
    return any(field == r or field.startswith(r + ".") for r in RUNTIME_ONLY)


def result_fields(config: ConfigDict | dict) -> dict[str, Any]:
    """{dotted field: value} of everything in `config` that shapes a phase's result (JSON-normalised)."""
    tree = json.loads(config.to_json_best_effort()) if isinstance(config, ConfigDict) else config
    off = tuple(f"{name}." for name in SWITCHED_SECTIONS if tree.get(name, {}).get("method") == "none")
    off += tuple(f"{name}." for name in OBJECTIVE_SECTIONS if name in tree and tree.get("objective") != name)
    off += tuple(f"{name}." for name in HEAD_SECTIONS if name in tree and tree.get("head") != name)
    return {k: v for k, v in _flatten(tree).items()
            if not _runtime_only(k) and not (k in NEUTRAL and NEUTRAL[k] == v) and not k.startswith(off)}


def fingerprint(config: ConfigDict | dict) -> str:
    """Hash of what determines a phase's result (not where it is written, what it is called or how it logs)."""
    return hashlib.sha256(json.dumps(result_fields(config), sort_keys=True).encode()).hexdigest()[:10]


# {absolute workdir: summary} of the phases this process saw finish or found finished: the next phase starts
# from the summary it was handed, the same on every host, instead of racing to read DONE.json from shared storage.
_FINISHED: dict[str, dict] = {}


def _summary(path: files.Path) -> dict | None:
    return read_json(path / DONE) if (path / DONE).exists() else None


def finished(workdir: PathLike) -> dict | None:
    """The summary of a phase that completed in `workdir` (local or in a bucket), or None."""
    key = files.absolute(workdir)
    return _FINISHED.get(key) or _summary(files.path(workdir))


def require_finished(workdir: PathLike, what: str) -> dict:
    """The summary of the finished phase in `workdir`, decided on process 0 for every host (or handed over when
    this process saw it finish); a one-line error on every host if it never finished."""
    key = files.absolute(workdir)
    summary = _FINISHED.get(key) or decide(f"read {key}/{DONE}", lambda: _summary(files.path(workdir)), timeout=600)
    if summary is None:
        raise UserError(f"{what}={str(workdir)!r} is a phase that has not finished (no {DONE}); rerun the command "
                        "that trains it until it completes, then start from it")
    _FINISHED[key] = summary
    return summary


class Workdir:
    """The workdir of one phase run with `config` (its `workdir` and `name` fields). As a context manager it
    claims the workdir for this run (see `claim`) and releases it on the way out, however the run ends."""

    def __init__(self, config: ConfigDict):
        self.path, self.phase, self.config = files.path(config.workdir), config.name, config
        self._lease: _Lease | None = None

    def __enter__(self) -> dict | None:
        return self.claim()

    def __exit__(self, *exc: object) -> None:
        if self._lease is not None:
            self._lease.stop()
            _release(self.path / LOCK)
            self._lease = None

    def claim(self) -> dict | None:
        """The summary when the phase already finished with this config (nothing to run); otherwise lock the
        workdir and record the config, then None. A config that differs from the recorded one in a result field
        is an error, and so is a workdir another live run holds. Decided on process 0 (which holds the lock) for
        every host: all go on together or raise the same error."""
        summary = decide(f"claim {self.path}", self._claim, timeout=600)
        if summary is not None:
            _FINISHED[files.absolute(self.config.workdir)] = summary
        return summary

    def _claim(self) -> dict | None:
        recorded = self.path / CONFIG
        started = self.path.is_dir() and any(p.name not in (CONFIG, LOCK, PREPARED) for p in self.path.iterdir())
        if recorded.exists() and started:  # a run that failed before writing anything left nothing to mix
            self._check_drift(read_json(recorded)["config"])
        if (summary := _summary(self.path)) is not None:
            return summary
        _FINISHED.pop(files.absolute(self.config.workdir), None)
        self._lease = _Lease(self.path / LOCK, _acquire(self.path / LOCK))
        if not (recorded.exists() and started):
            write_json(recorded, {"phase": self.phase, "fingerprint": fingerprint(self.config),
                                  "config": json.loads(self.config.to_json_best_effort())})
        return None

    def _check_drift(self, recorded: dict) -> None:
        old, new = result_fields(recorded), result_fields(self.config)
        changed = sorted(k for k in old.keys() | new.keys() if old.get(k, "<absent>") != new.get(k, "<absent>"))
        if changed:
            shown = ", ".join(f"{k}: {_short(old.get(k, '<absent>'))} -> {_short(new.get(k, '<absent>'))}"
                              for k in changed[:6]) + (f" and {len(changed) - 6} more" if len(changed) > 6 else "")
            state = "finished" if _summary(self.path) is not None else "was started"
            raise UserError(f"{self.path} {state} with another config ({shown}); use a new workdir "
                            f"(--config.workdir=...) or rerun with the config recorded in {self.path / CONFIG}")

    def complete(self, summary: dict) -> dict:
        """Mark the phase finished: process 0 writes the marker (the last file a phase writes) and no process
        returns before it is written; every one keeps the summary for the phase that starts from this one."""
        def write() -> dict:
            write_json(self.path / DONE, summary)
            return summary
        done = decide(f"write {self.path / DONE}", write, timeout=600)
        _FINISHED[files.absolute(self.config.workdir)] = done
        return done


def _start_time(pid: int) -> str | None:
    """The kernel's start time of process `pid` (Linux), so a recycled pid is not taken for the lock's owner."""
    try:
        return LocalPath(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(holder: dict) -> bool:
    """Whether the lock's owner still runs: on this host, whether its process does; on another host (which we
    cannot look at), whether it renewed the lock within LEASE_SECONDS."""
    pid = holder.get("pid")
    if holder.get("host") != socket.gethostname():
        beat = holder.get("beat")
        return isinstance(beat, (int, float)) and time.time() - beat < LEASE_SECONDS
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    started = _start_time(pid)
    return holder.get("start") is None or started is None or started == holder["start"]


class _Lease:
    """Renews the lock at `path` every RENEW_SECONDS in a background thread while this run holds it."""

    def __init__(self, path: files.Path, me: dict):
        self._path, self._me, self._stopped = path, me, threading.Event()
        self._thread = threading.Thread(target=self._renew, name="workdir-lease", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        while not self._stopped.wait(RENEW_SECONDS):
            try:
                if read_json(self._path).get("pid") == self._me["pid"]:
                    write_json(self._path, {**self._me, "beat": time.time()})
            except (OSError, ValueError) as err:  # a slow or failing store: the next renewal tries again
                log.warning("could not renew the lock %s (%s)", self._path, err)

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join()


def _acquire(path: files.Path) -> dict:
    """Create `path` holding this process's identity, atomically and complete (locally a hard link of a written
    file; in a bucket an object created only if absent); a lock whose owner is dead (same host) is broken, a live
    one is a one-line error naming it."""
    me = {"host": socket.gethostname(), "pid": os.getpid(), "start": _start_time(os.getpid()),
          "since": time.strftime("%Y-%m-%d %H:%M:%S"), "beat": time.time()}
    create = _create_remote if files.is_remote(path) else _create_local
    for _ in range(3):
        if create(path, json.dumps(me)):
            return me
        try:
            holder = read_json(path)
        except (OSError, ValueError):
            continue  # released meanwhile
        if holder == me:
            return me
        if _alive(holder):
            raise UserError(f"{path.parent} is in use by another run (pid {holder.get('pid')} on "
                            f"{holder.get('host')}, since {holder.get('since')}); wait for it to end, or if "
                            f"that run is gone, delete {path} (another host's lock lapses {LEASE_SECONDS} s after "
                            "its run stops renewing it)") from None
        log.warning("breaking the stale lock of a dead run in %s (pid %s on %s)", path.parent,
                    holder.get("pid"), holder.get("host"))
        path.unlink(missing_ok=True)
    raise UserError(f"could not lock {path.parent}: other runs keep taking it; run one at a time")


def _create_local(path: files.Path, text: str) -> bool:
    """Whether this call created `path` with `text` (False: it exists)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = LocalPath(f"{path}.{os.getpid()}")
    tmp.write_text(text)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)


def _create_remote(path: files.Path, text: str) -> bool:
    """Whether this call created the object `path` with `text`: a write that GCS refuses when the object
    exists (generation precondition 0), read back in case a store ignores the precondition."""
    import fsspec
    if path.exists():
        return False
    try:
        fsspec.filesystem(str(path).split("://")[0]).pipe_file(str(path), text.encode(), mode="create")
    except (FileExistsError, OSError):
        return False
    return path.read_text() == text


def _release(path: files.Path) -> None:
    """Remove the lock if it is still this process's."""
    try:
        if read_json(path).get("pid") == os.getpid():
            path.unlink()
    except (OSError, ValueError):
        pass


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."
