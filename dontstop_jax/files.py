"""Every file the tool reads or writes, on a local disk or in a bucket (`gs://bucket/...`), and atomic publication.

Paths are `etils.epath.Path`s (what Orbax uses too): local paths behave as before, `gs://` URLs go through
gcsfs (`pip install -e ".[gcs]"`). Three rules make a bucket safe to share between hosts that share nothing else:
- What a later run reads is published whole: locally by a rename, in a bucket by one object upload per file,
  a directory's marker file last (`publishing`).
- What a process reads many times (a model directory, a tokenizer) is copied once per host into its local cache
  (`localize`, `local_cache`), verified by size; a prepared corpus is read in place, a few rows at a time.
- Nothing is renamed in a bucket (object stores copy and delete; a crash between them leaves both).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import importlib.util
import io
import json
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path as LocalPath
from typing import Any, TypeVar

from etils import epath

from dontstop_jax.errors import UserError

Path = epath.Path
PathLike = str | os.PathLike
CACHE_ENV = "DONTSTOP_CACHE"  # this host's cache root (default ~/.cache/dontstop_jax)
# Pauses between whole-operation retries of a bucket transfer that still fails after gcsfs's own retries (about
# 30 s of backoff per try): with them a server gone for a minute or two is waited out.
RETRY_PAUSES = (2.0, 8.0, 30.0)
T = TypeVar("T")


def is_remote(path: PathLike) -> bool:
    """Whether `path` is a URL (gs://...) rather than a local path."""
    return "://" in os.fspath(path)


def path(where: PathLike) -> epath.Path:
    """`where` as a Path: local, or in a bucket (a missing cloud filesystem package is a one-line error)."""
    if is_remote(where):
        scheme = os.fspath(where).split("://", 1)[0]
        if scheme != "gs":
            raise UserError(f"{os.fspath(where)}: unsupported URL scheme {scheme}://; use a local path or gs://")
        if importlib.util.find_spec("gcsfs") is None:
            raise UserError(f'{os.fspath(where)} needs the gcsfs package; pip install -e ".[gcs]"')
        _fresh_listings(scheme)
    return epath.Path(where)


def _fresh_listings(scheme: str) -> None:
    """Make fsspec ask the bucket every time instead of caching listings for the life of the process: other
    hosts write files this one waits for (a prepared corpus, a finished phase's marker)."""
    import fsspec.config

    fsspec.config.conf.setdefault(scheme, {}).setdefault("use_listings_cache", False)


def absolute(where: PathLike) -> str:
    """`where` as an absolute path string (a URL as it is): what provenance and summaries record."""
    return os.fspath(where) if is_remote(where) else os.path.abspath(where)


def local_cache(*parts: str) -> LocalPath:
    """A directory of this host's cache (`$DONTSTOP_CACHE`, default ~/.cache/dontstop_jax): where bucket data is
    copied to be read locally. Each host has its own; nothing in it is shared."""
    root = os.environ.get(CACHE_ENV) or os.path.expanduser("~/.cache/dontstop_jax")
    directory = LocalPath(root, *parts)
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def _remove(path: LocalPath) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _fsync(path: LocalPath) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


@contextlib.contextmanager
def publishing(where: PathLike, *, last: str | None = None) -> Iterator[LocalPath]:
    """Yield a private local temporary path to write (a file, or a directory the caller creates) that becomes
    `where` on success, replacing what was there (a directory whole); on any failure it is removed and `where`
    is left as it was. Locally: fsync and rename. In a bucket: upload each file, `last` (a directory's marker,
    e.g. its config.json) after all others, then delete stale objects."""
    if is_remote(where):
        with _publishing_remote(path(where), last) as tmp:
            yield tmp
        return
    target = LocalPath(where)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    _remove(tmp)
    try:
        yield tmp
        if tmp.is_dir():
            old = target.with_name(f".{target.name}.old-{os.getpid()}-{threading.get_ident()}")
            for attempt in range(5):  # another process may publish the same directory between the two moves
                _remove(old)
                if target.exists():
                    os.replace(target, old)
                try:
                    os.replace(tmp, target)
                    break
                except OSError as err:
                    if err.errno not in (errno.ENOTEMPTY, errno.EEXIST) or attempt == 4:
                        raise
            _remove(old)
        else:
            _fsync(tmp)
            os.replace(tmp, target)
    except BaseException as err:
        _remove(tmp)
        if isinstance(err, OSError) and err.filename is None:  # numpy's short writes name no file
            err.filename = str(target)
        raise


@contextlib.contextmanager
def _publishing_remote(target: epath.Path, last: str | None) -> Iterator[LocalPath]:
    with tempfile.TemporaryDirectory(prefix="dontstop-publish-") as scratch:
        tmp = LocalPath(scratch, target.name)
        yield tmp
        if not tmp.is_dir():
            upload(tmp, target)
            return
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        files.sort(key=lambda p: p.relative_to(tmp).as_posix() == last)  # the marker goes up last
        keep = {p.relative_to(tmp).as_posix() for p in files}
        for name, stale in walk(target).items():
            if name not in keep:
                stale.unlink()
        for file in files:
            upload(file, target / file.relative_to(tmp).as_posix())


def walk(directory: PathLike) -> dict[str, epath.Path]:
    """{name relative to `directory` (posix): path} of every file under it, at any depth."""
    if not is_remote(directory):
        return {p.relative_to(directory).as_posix(): Path(p) for p in LocalPath(directory).rglob("*") if p.is_file()}
    import fsspec

    scheme, rest = os.fspath(directory).split("://", 1)
    rest = rest.rstrip("/")
    return {found[len(rest) + 1 :]: Path(f"{scheme}://{found}") for found in fsspec.filesystem(scheme).find(rest)}


def retrying(what: PathLike, operation: Callable[[], T]) -> T:
    """operation(), tried again after each of RETRY_PAUSES while it fails for a bucket fault (`bucket_cause`: 5xx,
    429, a dropped or refused connection); what still fails is `BucketFault` naming `what`. Operations must be
    repeatable (whole-object writes, reads)."""
    for pause in (*RETRY_PAUSES, None):
        try:
            return operation()
        except Exception as err:  # noqa: BLE001 (only bucket faults are retried; the rest re-raised as they are)
            cause = bucket_cause(err)
            if cause is None:
                raise
            if pause is None:
                raise BucketFault(what, cause) from err
            time.sleep(pause)
    raise AssertionError("unreachable")


def upload(local: LocalPath, target: epath.Path) -> None:
    """Copy one local file to `target` (a single object write: readers see all of it or none)."""

    def copy() -> None:
        with open(local, "rb") as src, target.open("wb") as dst:
            shutil.copyfileobj(src, dst, 16 << 20)

    retrying(target, copy)


def download(source: epath.Path, local: LocalPath) -> None:
    """Copy the file `source` (in a bucket) to the local file `local`, streamed."""

    def copy() -> None:
        with source.open("rb") as src, open(local, "wb") as dst:
            shutil.copyfileobj(src, dst, 16 << 20)

    retrying(source, copy)


def write_text(where: PathLike, text: str) -> None:
    with publishing(where) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(where: PathLike, payload: Any) -> None:
    write_text(where, json.dumps(payload, indent=2, sort_keys=True))


def read_json(where: PathLike) -> Any:
    return json.loads(retrying(where, lambda: path(where).read_text(encoding="utf-8")))


def glob(pattern: str) -> list[str]:
    """The sorted files (not directories) a local or gs:// glob matches."""
    if not is_remote(pattern):
        import glob as globlib

        return sorted(f for f in globlib.glob(pattern) if os.path.isfile(f))
    scheme, rest = pattern.split("://", 1)
    root, _, tail = rest.partition("/")
    found = path(f"{scheme}://{root}").glob(tail)
    return sorted(os.fspath(p) for p in found if p.is_file())


def localize(where: PathLike) -> LocalPath:
    """A local path with `where`'s content: `where` itself when local; a file or directory in a bucket is copied
    once per host into the local cache, keyed by its URL and its files' sizes and times, so an updated
    original is fetched again and an unchanged one never."""
    if not is_remote(where):
        return LocalPath(where)
    source = path(where)
    if not source.exists():
        raise UserError(f"{os.fspath(where)} does not exist; check the bucket path")
    entries = walk(source) if source.is_dir() else {"": source}
    stats = {name: source_stat(p) for name, p in entries.items()}
    key = hashlib.sha256(json.dumps([os.fspath(where), stats], sort_keys=True).encode()).hexdigest()[:16]
    copy = local_cache("remote", key) / (source.name or "root")
    if copy.exists():
        return copy
    with publishing(copy) as tmp:
        for name, remote in entries.items():
            local = tmp / name if name else tmp
            local.parent.mkdir(parents=True, exist_ok=True)
            download(remote, local)
            if local.stat().st_size != stats[name][0]:
                raise OSError(errno.EIO, f"short copy of {remote}", os.fspath(local))
    return copy


def source_stat(where: epath.Path) -> tuple[int, int]:
    """(size, mtime: ns locally, s in a bucket) of a file: what says it changed."""
    if not is_remote(where):
        st = os.stat(where)
        return st.st_size, st.st_mtime_ns
    st = where.stat()
    return int(st.length), int(st.mtime)


@contextlib.contextmanager
def open_read(where: PathLike, buffer_bytes: int = 8 << 20) -> Iterator[Any]:
    """`where` opened for reading bytes; a bucket file behind a large buffer (gcsfs files serve each readline
    with a request of its own: reading a file line by line was thousands of times slower than locally)."""
    if not is_remote(where):
        with open(where, "rb") as f:
            yield f
        return
    with path(where).open("rb") as raw, io.BufferedReader(raw, buffer_bytes) as f:
        yield f


@contextlib.contextmanager
def staged(where: PathLike) -> Iterator[LocalPath]:
    """A local path with the content of file `where` for the duration of the block (a bucket file is copied to
    a temporary file and deleted after): for readers that need a real file, e.g. byte-range workers."""
    if not is_remote(where):
        yield LocalPath(where)
        return
    with tempfile.TemporaryDirectory(prefix="dontstop-stage-") as scratch:
        local = LocalPath(scratch, path(where).name)
        download(path(where), local)
        yield local


# What a filesystem fault means for the user: (cause, fix). Short writes without an errno are disk-full too.
_FAULTS = {
    errno.ENOSPC: ("no space left on the device", "free space"),
    errno.EDQUOT: ("disk quota exceeded", "free space or raise the quota"),
    errno.EFBIG: ("file too large for the file size limit", "raise the limit (ulimit -f) or free space"),
    errno.EROFS: ("read-only file system", "write somewhere writable (--config.workdir, data.cache_dir)"),
    errno.EACCES: ("permission denied", "make it writable or write somewhere else"),
    errno.EPERM: ("operation not permitted", "make it writable or write somewhere else"),
}
_TENSORSTORE = re.compile(r"\[os_error_code='(\d+)'\]")  # how Orbax's tensorstore reports an OS error
_QUOTED_PATH = re.compile(r'"(/[^"]+)"')


class BucketFault(Exception):
    """A bucket object that could not be read or written after retries; `describe_fault` makes it one line."""

    def __init__(self, what: PathLike, cause: str):
        super().__init__(f"{os.fspath(what)}: {cause}")
        self.what, self.cause = os.fspath(what), cause


_UNAVAILABLE = re.compile(r"HTTP response code: (?:429|5\d\d)|CURL error[^;\n]*|\bUNAVAILABLE\b|\bDEADLINE_EXCEEDED\b")


def bucket_cause(err: BaseException | None) -> str | None:
    """A few words on why, where `err`'s chain holds a fault of the storage service rather than of the request:
    a 5xx or 429 answer, a dropped, refused or timed-out connection (gcsfs, aiohttp, tensorstore). None otherwise."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        code = getattr(err, "code", None)
        if type(err).__name__ == "HttpError" and isinstance(code, int) and (code == 429 or code >= 500):
            return f"HTTP {code}"
        if isinstance(err, (ConnectionError, TimeoutError)) or type(err).__module__.startswith("aiohttp"):
            return (str(err).splitlines() or [type(err).__name__])[0][:160] or type(err).__name__
        # (JAX's own runtime errors carry the same status words for its collectives and coordination service)
        if (
            not isinstance(err, OSError)
            and type(err).__name__ != "JaxRuntimeError"
            and (match := _UNAVAILABLE.search(str(err)))
        ):
            return match.group(0)
        err = err.__cause__ or err.__context__
    return None


@contextlib.contextmanager
def naming(what: PathLike) -> Iterator[None]:
    """Re-raise a bucket fault inside the block as `BucketFault` naming `what` (e.g. a checkpoint directory)."""
    try:
        yield
    except BucketFault:
        raise
    except Exception as err:
        cause = bucket_cause(err)
        if cause is None:
            raise
        raise BucketFault(what, cause) from err


def describe_fault(err: BaseException | None) -> str | None:
    """One line for a disk-full, read-only or permission fault anywhere in `err`'s chain (checkpoints, caches,
    metrics, exports), or for a bucket that kept failing, naming the path and the cause; None for any other error."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        code, path, text = None, None, str(err)
        if isinstance(err, BucketFault) or (cause := bucket_cause(err)) is not None:
            what, cause = (err.what, err.cause) if isinstance(err, BucketFault) else ("the bucket", cause)
            return (
                f"cannot reach {what} ({cause}), still failing after retries with backoff; check the bucket and "
                "the network, then rerun the same command (it resumes from the last good checkpoint)"
            )
        if isinstance(err, OSError):
            code, path = err.errno, err.filename
            if code is None and re.search(r"\d+ requested and \d+ written", " ".join(map(str, err.args))):
                code = errno.ENOSPC
        elif match := _TENSORSTORE.search(text):
            code = int(match.group(1))
            paths = _QUOTED_PATH.findall(text)
            path = paths[-1] if paths else None
        if code in _FAULTS:
            cause, fix = _FAULTS[code]
            return (
                f"cannot write {path or 'a file'}: {cause}; {fix}, then rerun the same command (what was "
                "written before is intact)"
            )
        err = err.__cause__ or err.__context__
    return None
