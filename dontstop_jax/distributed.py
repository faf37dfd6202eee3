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

import collections
import contextvars
import dataclasses
import functools
import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar, cast

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dontstop_jax.errors import Fault, Interrupted, UserError

T = TypeVar("T")
EXPLICIT = ("DONTSTOP_COORDINATOR", "DONTSTOP_NUM_PROCESSES", "DONTSTOP_PROCESS_ID")
JOIN_MINUTES = 10  # how long a process waits for the others to start
# How long a process waits for process 0's decision (DONTSTOP_WAIT_SECONDS; preparing a corpus or selecting
# documents on process 0 can take hours), and how often it says what it waits for.
WAIT_SECONDS, REPORT_SECONDS = 24 * 3600, 30
# A decision's key is its name and how often this process took one of that name: the processes must take the
# same decisions of each name, not all decisions in one order (process 0 may take one of its own, e.g. a
# checkpoint's step inside work the others skip, without shifting the keys of the rest).
_decisions: collections.Counter[str] = collections.Counter()
_alone = contextvars.ContextVar("alone", default=False)  # inside work that process 0 does by itself


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
            raise UserError(
                f"{', '.join(given)} set without {missing}; set all three (or none) to join a multi-process run"
            )
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
        # Each CPU process publishes its devices when it first builds its backend and waits for the others'
        # (2 minutes by default): on a loaded machine one process can reach that point minutes after another.
        jax.config.update("jax_cpu_get_local_topology_timeout_minutes", JOIN_MINUTES)
        jax.config.update("jax_cpu_get_global_topology_timeout_minutes", JOIN_MINUTES + 1)
        where = joined.kwargs.get("coordinator_address") or joined.source
        print(f"joining the other processes ({where}; waiting up to {JOIN_MINUTES} min)", file=sys.stderr, flush=True)
        jax.distributed.initialize(**joined.kwargs, initialization_timeout=JOIN_MINUTES * 60)
        jax.devices()  # build the backend now, right after joining, so every process meets the others here
    return joined


def process_major(devices: Sequence[Any], shape: Sequence[int]) -> np.ndarray:
    """Devices reshaped in (process, id) order: process p gets the p-th contiguous block of the grid."""
    ordered = sorted(devices, key=lambda d: (d.process_index, d.id))
    grid = np.empty(len(ordered), dtype=object)
    grid[:] = ordered
    return grid.reshape(tuple(shape))


@functools.cache
def _any_across() -> tuple[NamedSharding, Callable[[jax.Array], jax.Array]]:
    mesh = Mesh(process_major(jax.devices(), (jax.device_count(),)), ("all",))
    return NamedSharding(mesh, P("all")), jax.jit(jnp.any, out_shardings=NamedSharding(mesh, P()))


def any_process(flag: bool) -> jax.Array:
    """True where `flag` is true on any process. Every process must call it at the same point; the result is
    a jax.Array, so reading it can wait (e.g. a step) instead of stalling the host now."""
    sharding, reduce = _any_across()
    return reduce(jax.make_array_from_process_local_data(sharding, np.full(jax.local_device_count(), flag)))


def decide(name: str, choose: Callable[[], T], timeout: float | None = None) -> T:
    """What `choose` returns on process 0, on every process: a choice all hosts must share (a workdir's lock, a
    phase's completion, a summary read from shared storage) is made once and handed to the others, and so is
    its failure (the same one-line UserError, or `Interrupted`, on every process). The result must be JSON.
    The others wait up to `timeout` seconds (default DONTSTOP_WAIT_SECONDS), saying every REPORT_SECONDS what
    they wait for. Inside work that process 0 does alone (`on_first_process`) it is a plain call."""
    return cast(T, _first(name, choose, timeout, share=True))  # shared: every process gets process 0's value


def on_first_process(name: str, write: Callable[[], T], timeout: float | None = None) -> T | None:
    """Run `write` (something that writes to shared storage: a prepared corpus, a selection, an export) on
    process 0 only, and hold the others until it is done, so none reads a file that is not there yet. Returns
    `write`'s result on process 0 and None on the others. When `write` fails or is interrupted on process 0,
    the others raise too instead of going on without its files."""
    return _first(name, write, timeout, share=False)


def _first(name: str, choose: Callable[[], T], timeout: float | None, share: bool) -> T | None:
    if jax.process_count() == 1 or _alone.get():
        return choose()
    key = f"dontstop/{name}/{_decisions[name]}"
    _decisions[name] += 1
    client = _client()
    if jax.process_index() == 0:
        token = _alone.set(True)
        try:
            result = choose()
        except Interrupted as err:
            client.key_value_set(key, json.dumps({"interrupted": [err.phase, err.step]}))
            raise
        except UserError as err:
            client.key_value_set(key, json.dumps({"user": str(err)}))
            raise
        except BaseException as err:
            client.key_value_set(key, json.dumps({"fault": f"{type(err).__name__}: {err}"[:500]}))
            raise
        finally:
            _alone.reset(token)
        payload = json.dumps({"result": result if share else None})
        client.key_value_set(key, payload)
        return json.loads(payload)["result"] if share else result  # what the others get, to the letter
    outcome = json.loads(_wait(client, key, f"process 0 to {name}", timeout))
    if "interrupted" in outcome:
        raise Interrupted(*outcome["interrupted"])
    if "user" in outcome:
        raise UserError(outcome["user"])
    if "fault" in outcome:
        raise Fault(f"process 0 failed in {name} ({outcome['fault']}); its log has the details")
    return outcome["result"]


def all_codes(code: int) -> list[int]:
    """Every process's `code` (a small status: 0 = fine), in process order, on every process: what each
    process's own attempt at a shared step came to (a checkpoint read, its share of a corpus), so all of them
    go on or all stop. Every process calls it at the same point; inside work process 0 does alone, a plain list."""
    if jax.process_count() == 1 or _alone.get():
        return [code]
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(np.array([code], np.int32))).reshape(-1).tolist()


def _client() -> Any:
    from jax._src import distributed as state

    return state.global_state.client


def _wait(client: Any, key: str, what: str, timeout: float | None) -> str:
    """The value of `key` once process 0 sets it; a progress line every REPORT_SECONDS, a Fault after `timeout`."""
    limit = timeout if timeout is not None else float(os.environ.get("DONTSTOP_WAIT_SECONDS", WAIT_SECONDS))
    waited = 0.0
    while True:
        chunk = max(1.0, min(REPORT_SECONDS, limit - waited))
        try:
            return client.blocking_key_value_get(key, int(chunk * 1000))
        except Exception as err:  # noqa: BLE001 (jax raises a plain runtime error; only a deadline is waited out)
            if "DEADLINE_EXCEEDED" not in str(err) and "timed out" not in str(err).lower():
                raise
        waited += chunk
        if waited >= limit:
            raise Fault(
                f"waited {waited:.0f} s for {what}; it did not answer (see process 0's log), so this "
                "process stops; raise DONTSTOP_WAIT_SECONDS if it needs longer"
            )
        print(f"waiting for {what}: {waited:.0f} s", file=sys.stderr, flush=True)
