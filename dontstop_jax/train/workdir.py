"""A phase's workdir contract: the config that made it, its completion marker, and no silent drift.

    WORKDIR/phase_config.json  the full config of the run and its fingerprint, recorded when the phase starts
    WORKDIR/DONE.json          the phase's summary, written last: only a workdir holding it is a finished phase
    WORKDIR/.lock              host, pid and start time of the run working in it (absent when none is), and
                               when it last renewed it (every RENEW_SECONDS; another host's run that stopped
                               renewing for LEASE_SECONDS, e.g. on a preempted VM, is dead)

A phase's record names what it was made from by content, not by place (`PLACES`): its parent by the parent's
fingerprint, its data by its files' names and sizes. Moving or copying a workdir or a whole grid (to another
disk, into a bucket and back) keeps every finished phase. Records written before (places as written) are still
read, and updated once.

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
import re
import socket
import threading
import time
from pathlib import Path as LocalPath
from typing import Any

from ml_collections import ConfigDict

from dontstop_jax import files
from dontstop_jax.distributed import decide
from dontstop_jax.errors import UserError
from dontstop_jax.fields import PHASE_FIELDS, declared, flatten, undeclared
from dontstop_jax.files import PathLike, read_json, write_json

log = logging.getLogger(__name__)
DONE, CONFIG, LOCK = "DONE.json", "phase_config.json", ".lock"
PREPARED = "prepared"  # the default prepared-data cache of a phase (data.cache_dir unset): not a result
# Result fields that name a place (a file, a directory, a glob, a model or a phase's workdir): each counts by what
# is there (`place_identity`), so a workdir or a grid moved or copied elsewhere keeps its phases.
PLACES = (
    "init",
    "init_delta",
    "tokenizer",
    "data.sources",
    "data.span_masking.terms",
    "task.path",
    "unit_gates",
    "sources",
    "curated_sources",
    "n_from",
    "embedding.lm.init",
)
INPUTS = "inputs"  # the record's {place field: identity}; records written before it existed lack it
RENEW_SECONDS, LEASE_SECONDS = 60, 600


def result_fields(config: ConfigDict | dict, strict: bool = True) -> dict[str, Any]:
    """{dotted field: value} of everything in `config` that shapes a phase's result (JSON-normalised). A field
    fields.py does not declare is an error (`strict`), or, in a config recorded by an older version, a result."""
    tree = json.loads(config.to_json_best_effort()) if isinstance(config, ConfigDict) else config
    flat, out = flatten(tree), {}
    for key, value in flat.items():
        if (field := declared(key, PHASE_FIELDS)) is None:
            if strict:
                raise UserError(undeclared(key))
            out[key] = value
        elif field.counted(value, flat):
            out[key] = value
    return out


def digest(tree: Any) -> str:
    """A short hash of a JSON tree."""
    return hashlib.sha256(json.dumps(tree, sort_keys=True).encode()).hexdigest()[:10]


def fingerprint(config: ConfigDict | dict) -> str:
    """Hash of what determines a phase's result (not where it is written, what it is called or how it logs, nor
    where its parent and data are: what they hold)."""
    return digest(identified(result_fields(config)))


def legacy_fingerprint(config: ConfigDict | dict) -> str:
    """The fingerprint of versions that counted places as written: what names the directories of their grids."""
    return digest(result_fields(config))


def identified(fields: dict[str, Any]) -> dict[str, Any]:
    """`fields` (from `result_fields`) with each place replaced by what it holds."""
    return {k: place_identity(v) if k in PLACES else v for k, v in fields.items()}


def place_identity(place: Any) -> Any:
    """What a place holds: a phase's workdir, or a file or directory in it, is that phase's fingerprint (and the
    name inside); any other file, directory or glob is its files' names (relative to it) and sizes, not their
    times (a copy has new ones). Anything else (empty, scratch, a Hub id, an hf:/tfds: source, a path that is not
    there) counts as written. A list counts element by element, a corpus source with options by its path."""
    if isinstance(place, (list, tuple)):
        return [place_identity(p) for p in place]
    if isinstance(place, dict) and "path" in place:
        return {**place, "path": place_identity(place["path"])}
    if not isinstance(place, str) or place in ("", "scratch") or place.startswith(("hf:", "tfds:")):
        return place
    pattern = re.search(r"[*?[]", place)
    root = files.path(place[: pattern.start()].rpartition("/")[0] or "." if pattern else place)
    for home in (root, root.parent):
        if (home / CONFIG).exists():
            inside = _relative(place, os.fspath(home))
            return f"phase {_recorded_fingerprint(home)}" + (f"/{inside}" if inside != "." else "")
    if pattern:
        found = {_relative(f, os.fspath(root)): files.path(f) for f in files.glob(place)}
    elif root.is_file():
        found = {root.name: root}
    elif root.is_dir():
        found = files.walk(root)
    else:
        return place
    sizes = sorted((name, files.source_stat(path)[0]) for name, path in found.items())
    return f"{len(sizes)} files, {sum(size for _, size in sizes)} bytes, #{digest(dict(sizes))}"


def _relative(place: str, root: str) -> str:
    """`place` relative to the directory `root` (posix; "." for root itself)."""
    if files.is_remote(place):
        return place.rstrip("/")[len(root.rstrip("/")) + 1 :] or "."
    return LocalPath(os.path.relpath(place, root)).as_posix()


def _recorded_fingerprint(workdir: files.Path) -> str:
    """The fingerprint a phase's record names (of an older record: computed from its config, where it was made)."""
    record = read_json(workdir / CONFIG)
    return (
        record["fingerprint"] if INPUTS in record else digest(identified(result_fields(record["config"], strict=False)))
    )


def _record(config: ConfigDict) -> dict:
    """What `phase_config.json` holds: the config as given, and what its places held, with their fingerprint."""
    fields = identified(result_fields(config))
    return {
        "phase": config.name,
        "fingerprint": digest(fields),
        INPUTS: {k: fields[k] for k in PLACES if k in fields},
        "config": json.loads(config.to_json_best_effort()),
    }


def phase_directory(config: ConfigDict, root: files.Path, label: str) -> files.Path:
    """Where the phase `config` lives under `root`: `label-<fingerprint>`, unless an older version made it in place
    (named by its legacy fingerprint), or a directory of that phase was moved here after its record was updated."""
    new = root / f"{label}-{fingerprint(config)}"
    if new.exists() or not root.is_dir():
        return new
    if (legacy := root / f"{label}-{legacy_fingerprint(config)}").exists():
        return legacy
    for other in root.iterdir():
        if re.fullmatch(re.escape(label) + r"-[0-9a-f]{10}", other.name) and (other / CONFIG).exists():
            record = read_json(other / CONFIG)
            if INPUTS in record and record["fingerprint"] == new.name[-10:]:
                return other
    return new


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
        raise UserError(
            f"{what}={str(workdir)!r} is a phase that has not finished (no {DONE}); rerun the command "
            "that trains it until it completes, then start from it"
        )
    _FINISHED[key] = summary
    return summary


class Workdir:
    """The workdir of one phase run with `config` (its `workdir` and `name` fields). As a context manager it
    claims the workdir for this run (see `claim`) and releases it on the way out, however the run ends."""

    def __init__(self, config: ConfigDict):
        self.path, self.config = files.path(config.workdir), config
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
            record = read_json(recorded)
            self._check_drift(record)
            if INPUTS not in record:
                log.info(
                    "%s: its record (by an older version) now names its inputs by content, so the workdir can be moved",
                    self.path,
                )
                write_json(recorded, _record(self.config))
        if (summary := _summary(self.path)) is not None:
            return summary
        _FINISHED.pop(files.absolute(self.config.workdir), None)
        self._lease = _Lease(self.path / LOCK, _acquire(self.path / LOCK))
        if not (recorded.exists() and started):
            write_json(recorded, _record(self.config))
        return None

    def _check_drift(self, record: dict) -> None:
        """A one-line error naming the result fields `record` and this run's config differ in (places by what
        they hold)."""
        old, new = result_fields(record["config"], strict=False), result_fields(self.config)
        if INPUTS in record:
            old, new = {**old, **record[INPUTS]}, identified(new)
        elif old != new:  # an older record whose places differ as written: compare what they hold
            old, new = identified(old), identified(new)
        changed = sorted(k for k in old.keys() | new.keys() if old.get(k, "<absent>") != new.get(k, "<absent>"))
        if changed:
            shown = ", ".join(
                f"{k}: {_short(old.get(k, '<absent>'))} -> {_short(new.get(k, '<absent>'))}" for k in changed[:6]
            ) + (f" and {len(changed) - 6} more" if len(changed) > 6 else "")
            state = "finished" if _summary(self.path) is not None else "was started"
            raise UserError(
                f"{self.path} {state} with another config ({shown}); use a new workdir "
                f"(--config.workdir=...) or rerun with the config recorded in {self.path / CONFIG}"
            )

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
    me = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "start": _start_time(os.getpid()),
        "since": time.strftime("%Y-%m-%d %H:%M:%S"),
        "beat": time.time(),
    }
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
            raise UserError(
                f"{path.parent} is in use by another run (pid {holder.get('pid')} on "
                f"{holder.get('host')}, since {holder.get('since')}); wait for it to end, or if "
                f"that run is gone, delete {path} (another host's lock lapses {LEASE_SECONDS} s after "
                "its run stops renewing it)"
            ) from None
        log.warning(
            "breaking the stale lock of a dead run in %s (pid %s on %s)",
            path.parent,
            holder.get("pid"),
            holder.get("host"),
        )
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
