"""Join a multi-process run before JAX touches a device, so one mesh spans every process's devices.

How a process learns its peers (first match wins; `launch/run.sh` sets these up for each mode):
- `DONTSTOP_COORDINATOR=host:port`, `DONTSTOP_NUM_PROCESSES`, `DONTSTOP_PROCESS_ID`: explicit, for
  `run.sh local` or any hand-made launcher. `DONTSTOP_LOCAL_DEVICES=n` gives the process n CPU devices
  (tests without accelerators; also honoured by a single process).
- SLURM with several tasks: jax reads ranks and the coordinator from SLURM. With one task per node every GPU
  of the node stays visible (jax alone would keep only GPU <local rank>, its one-process-per-GPU layout).
- Cloud TPU VMs of a multi-host slice (`TPU_WORKER_HOSTNAMES` lists several workers), multi-slice
  (`MEGASCALE_COORDINATOR_ADDRESS`), or `DONTSTOP_TPU=1`: jax discovers the workers from TPU metadata.
A single process does nothing.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dontstop_jax.errors import Interrupted, UserError

T = TypeVar("T")
EXPLICIT = ("DONTSTOP_COORDINATOR", "DONTSTOP_NUM_PROCESSES", "DONTSTOP_PROCESS_ID")


@dataclasses.dataclass(frozen=True)
class Plan:
    """How this process joins: `source` names the mechanism, `kwargs` go to jax.distributed.initialize."""
    source: str  # "env", "slurm" or "tpu"
    kwargs: dict[str, Any]


def _int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise UserError(f"{name}={env[name]!r} is not an integer; set it to a whole number") from None


def _slurm_local_gpus(env: Mapping[str, str]) -> list[int] | None:
    """All GPUs of the node when SLURM runs one task per node; None lets jax pick one per task."""
    if env.get("SLURM_NTASKS") != env.get("SLURM_NNODES"):
        return None
    count = env.get("SLURM_GPUS_ON_NODE") or len([g for g in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if g])
    return list(range(int(count))) or None


def plan(env: Mapping[str, str]) -> Plan | None:
    """The join plan for this environment, or None for a single process."""
    given = [name for name in EXPLICIT if name in env]
    if given:
        if len(given) < len(EXPLICIT):
            missing = ", ".join(n for n in EXPLICIT if n not in env)
            raise UserError(f"{', '.join(given)} set without {missing}; set all three (or none) to join a "
                            "multi-process run")
        num, pid = _int(env, "DONTSTOP_NUM_PROCESSES"), _int(env, "DONTSTOP_PROCESS_ID")
        if not 0 <= pid < num:
            raise UserError(f"DONTSTOP_PROCESS_ID={pid} must be in [0, DONTSTOP_NUM_PROCESSES={num})")
        kwargs = {"coordinator_address": env["DONTSTOP_COORDINATOR"], "num_processes": num, "process_id": pid}
        return Plan("env", kwargs) if num > 1 else None
    if int(env.get("SLURM_NTASKS", "1")) > 1:
        return Plan("slurm", {"local_device_ids": _slurm_local_gpus(env)})
    tpu_hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
    if len(tpu_hosts) > 1 or "MEGASCALE_COORDINATOR_ADDRESS" in env or env.get("DONTSTOP_TPU") == "1":
        return Plan("tpu", {})
    return None


def initialize(env: Mapping[str, str] | None = None) -> Plan | None:
    """Apply `plan(env)` (default: os.environ). Idempotent; must run before the first JAX computation."""
    env = os.environ if env is None else env
    if jax.distributed.is_initialized():
        return None
    if "DONTSTOP_LOCAL_DEVICES" in env:
        jax.config.update("jax_num_cpu_devices", _int(env, "DONTSTOP_LOCAL_DEVICES"))
    joined = plan(env)
    if joined is not None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU collectives across processes
        jax.distributed.initialize(**joined.kwargs)
    return joined


@functools.cache
def _any_across() -> tuple[NamedSharding, Callable[[jax.Array], jax.Array]]:
    from dontstop_jax.engine.sharding import process_major
    mesh = Mesh(process_major(jax.devices(), (jax.device_count(),)), ("all",))
    return NamedSharding(mesh, P("all")), jax.jit(jnp.any, out_shardings=NamedSharding(mesh, P()))


def any_process(flag: bool) -> jax.Array:
    """True where `flag` is true on any process. Every process must call it at the same point; the result is
    a jax.Array, so reading it can wait (e.g. a step) instead of stalling the host now."""
    sharding, reduce = _any_across()
    return reduce(jax.make_array_from_process_local_data(sharding, np.full(jax.local_device_count(), flag)))


def on_first_process(name: str, write: Callable[[], T]) -> T | None:
    """Run `write` (something that writes to shared storage: a prepared corpus, a selection, an export) on
    process 0 only, then hold every process at barrier `name` until it is done, so none reads a file that is
    not there yet. Returns `write`'s result on process 0 and None on the others. When `write` fails or is
    interrupted on process 0, the others raise too instead of going on without its files."""
    if jax.process_count() == 1:
        return write()
    from jax.experimental import multihost_utils
    result, failure, outcome = None, None, np.zeros(2, np.int64)  # (0 done | 1 interrupted | 2 failed, step)
    if jax.process_index() == 0:
        try:
            result = write()
        except Interrupted as err:
            failure, outcome[:] = err, (1, err.step)
        except BaseException as err:
            failure, outcome[0] = err, 2
    multihost_utils.sync_global_devices(name)
    code, step = (int(v) for v in multihost_utils.broadcast_one_to_all(outcome))
    if failure is not None:
        raise failure
    if code == 1:
        raise Interrupted(name, step)
    if code == 2:
        raise UserError(f"process 0 failed in {name}; its log has the error")
    return result
