"""Choices every process of a multi-process run must share, made once: process 0's value, and whether all succeeded.

Each is a collective: every process calls it at the same point. In one process both are plain returns.
(Private to checkpoints and corpus preparation until `distributed` has its general decide-and-broadcast helper.)
"""

from __future__ import annotations

import json
from typing import Any

import jax
import numpy as np


def from_first(value: Any) -> Any:
    """Process 0's `value` (JSON-serialisable) on every process."""
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils
    data = np.frombuffer(json.dumps(value).encode(), np.uint8) if jax.process_index() == 0 else np.zeros(0, np.uint8)
    size = int(multihost_utils.broadcast_one_to_all(np.int32(len(data))))
    buffer = np.zeros(size, np.uint8)
    buffer[: len(data)] = data
    return json.loads(np.asarray(multihost_utils.broadcast_one_to_all(buffer)).tobytes().decode())


def gather(code: int) -> list[int]:
    """Every process's `code` (a small int: a status), in process order, on every process."""
    if jax.process_count() == 1:
        return [code]
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(np.array([code], np.int32))).reshape(-1).tolist()
