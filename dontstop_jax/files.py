"""Atomic publication: a file or directory appears under its name complete or not at all.

Every writer of something a later run reads (summaries, tables, adapter files, caches, exports) goes
through `publishing`, so a crash, a full disk or a SIGKILL never leaves a half-written file under a
name that readers trust.
"""

from __future__ import annotations

import contextlib
import json
import os
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
    except BaseException:
        _remove(tmp)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    with publishing(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, payload: Any) -> None:
    write_text(path, json.dumps(payload, indent=2, sort_keys=True))


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))
