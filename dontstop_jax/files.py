"""Atomic publication: a file or directory appears under its name complete or not at all.

Every writer of something a later run reads (summaries, tables, adapter files, caches, exports) goes
through `publishing`, so a crash, a full disk or a SIGKILL never leaves a half-written file under a
name that readers trust.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


@contextlib.contextmanager
def publishing(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a private temporary sibling of `path` to write (a file, or a directory the caller creates).
    On success it is fsynced and renamed onto `path`, replacing what was there (a directory whole);
    on any failure it is removed and `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    _remove(tmp)
    try:
        yield tmp
        if tmp.is_dir():
            old = path.with_name(f".{path.name}.old-{os.getpid()}-{threading.get_ident()}")
            if path.exists():
                os.replace(path, old)
            os.replace(tmp, path)
            _remove(old)
        else:
            _fsync(tmp)
            os.replace(tmp, path)
    except BaseException as err:
        _remove(tmp)
        if isinstance(err, OSError) and err.filename is None:  # numpy's short writes name no file
            err.filename = str(path)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    with publishing(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, payload: Any) -> None:
    write_text(path, json.dumps(payload, indent=2, sort_keys=True))


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


# What a filesystem fault means for the user: (cause, fix). Short writes without an errno are disk-full too.
_FAULTS = {errno.ENOSPC: ("no space left on the device", "free space"),
           errno.EDQUOT: ("disk quota exceeded", "free space or raise the quota"),
           errno.EFBIG: ("file too large for the file size limit", "raise the limit (ulimit -f) or free space"),
           errno.EROFS: ("read-only file system", "write somewhere writable (--config.workdir, data.cache_dir)"),
           errno.EACCES: ("permission denied", "make it writable or write somewhere else"),
           errno.EPERM: ("operation not permitted", "make it writable or write somewhere else")}
_TENSORSTORE = re.compile(r"\[os_error_code='(\d+)'\]")  # how Orbax's tensorstore reports an OS error
_QUOTED_PATH = re.compile(r'"(/[^"]+)"')


def describe_fault(err: BaseException) -> str | None:
    """One line for a disk-full, read-only or permission fault anywhere in `err`'s chain (checkpoints, caches,
    metrics, exports), naming the path and the cause; None for any other error."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        code, path, text = None, None, str(err)
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
            return (f"cannot write {path or 'a file'}: {cause}; {fix}, then rerun the same command (what was "
                    "written before is intact)")
        err = err.__cause__ or err.__context__
    return None
