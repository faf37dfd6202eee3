"""How a process decides to join a multi-process run, and the host-aware device layout of the mesh."""

from types import SimpleNamespace

import jax
import numpy as np
import pytest

from dontstop_jax.distributed import Plan, any_process, plan, process_major
from dontstop_jax.engine.sharding import make_mesh, rows_follow_processes
from dontstop_jax.errors import UserError

EXPLICIT = {"DONTSTOP_COORDINATOR": "10.0.0.1:1234", "DONTSTOP_NUM_PROCESSES": "4", "DONTSTOP_PROCESS_ID": "3"}


def _joins(env: dict) -> Plan:
    joined = plan(env)
    assert joined is not None
    return joined


def test_single_process_joins_nothing():
    assert plan({}) is None
    assert plan({**EXPLICIT, "DONTSTOP_NUM_PROCESSES": "1", "DONTSTOP_PROCESS_ID": "0"}) is None
    assert plan({"SLURM_NTASKS": "1", "SLURM_NNODES": "1"}) is None
    assert plan({"TPU_WORKER_HOSTNAMES": "localhost"}) is None  # a single-host TPU VM


def test_explicit_environment():
    joined = _joins(EXPLICIT)
    assert joined.source == "env"
    assert joined.kwargs == {"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3}


@pytest.mark.parametrize(
    "env, needle",
    [
        ({"DONTSTOP_COORDINATOR": "h:1"}, "DONTSTOP_NUM_PROCESSES, DONTSTOP_PROCESS_ID"),
        ({**EXPLICIT, "DONTSTOP_PROCESS_ID": "4"}, "must be in [0, DONTSTOP_NUM_PROCESSES=4)"),
        ({**EXPLICIT, "DONTSTOP_NUM_PROCESSES": "two"}, "DONTSTOP_NUM_PROCESSES='two' is not an integer"),
    ],
)
def test_explicit_environment_errors(env, needle):
    with pytest.raises(UserError, match=None) as err:
        plan(env)
    assert needle in str(err.value)


def test_slurm_one_task_per_node_keeps_every_gpu():
    per_node = _joins({"SLURM_NTASKS": "2", "SLURM_NNODES": "2", "SLURM_GPUS_ON_NODE": "8"})
    assert per_node.source == "slurm" and per_node.kwargs == {"local_device_ids": list(range(8))}
    from_cuda = _joins({"SLURM_NTASKS": "2", "SLURM_NNODES": "2", "CUDA_VISIBLE_DEVICES": "4,5,6,7"})
    assert from_cuda.kwargs == {"local_device_ids": [0, 1, 2, 3]}  # ordinals after CUDA_VISIBLE_DEVICES
    per_gpu = _joins({"SLURM_NTASKS": "16", "SLURM_NNODES": "2", "SLURM_GPUS_ON_NODE": "8"})
    assert per_gpu.kwargs == {"local_device_ids": None}  # jax's own one-GPU-per-task choice


@pytest.mark.parametrize(
    "env", [{"TPU_WORKER_HOSTNAMES": "t-0,t-1"}, {"MEGASCALE_COORDINATOR_ADDRESS": "a:1"}, {"DONTSTOP_TPU": "1"}]
)
def test_tpu_pods_let_jax_discover_workers(env):
    assert _joins(env).source == "tpu" and _joins(env).kwargs == {}


def _fake_devices(processes: int, per_process: int) -> list[SimpleNamespace]:
    return [SimpleNamespace(process_index=i // per_process, id=i) for i in range(processes * per_process)]


@pytest.mark.parametrize(
    "shape, ok",
    [((4, 1, 1), True), ((2, 2, 1), True), ((1, 4, 1), True), ((2, 1, 2), True), ((1, 2, 2), True), ((1, 1, 4), False)],
)
def test_process_major_layout_gives_each_host_its_loader_rows(shape, ok):
    devices = _fake_devices(2, 2)[::-1]  # any input order
    grid = process_major(devices, shape)
    assert [d.process_index for d in grid.flat] == [0, 0, 1, 1]
    assert rows_follow_processes(grid, 2) == ok  # tensor across hosts would need the same rows on both


def test_interleaved_hosts_are_detected():
    devices = _fake_devices(2, 2)
    grid = np.empty(4, dtype=object)
    grid[:] = [devices[0], devices[2], devices[1], devices[3]]
    assert not rows_follow_processes(grid.reshape(4, 1, 1), 2)


def test_single_process_mesh_unchanged_and_hybrid_option():
    devices = jax.devices()[:4]
    plain = make_mesh((2, 2, 1), devices)
    assert [d.id for d in plain.devices.flat] == [d.id for d in devices]
    hybrid = make_mesh((-1, 2, 1), devices, dcn_shape=(1, 1, 1))  # one process = one granule
    assert hybrid.shape == {"data": 2, "fsdp": 2, "tensor": 1}
    with pytest.raises(UserError, match="dcn_shape"):
        make_mesh((2, 2, 1), devices, dcn_shape=(2, 1, 1))


def test_any_process_in_one_process():
    assert bool(any_process(True)) and not bool(any_process(False))


_FIRST_PROCESS_WRITES = """
import os, sys, time
from pathlib import Path
from dontstop_jax import distributed
distributed.initialize()
import jax
target = Path(sys.argv[1])

def write():
    time.sleep(2)  # the other process reaches the barrier long before this file exists
    target.write_text(str(jax.process_index()))
    return "written"

result = distributed.on_first_process("test", write)
print(jax.process_index(), result, target.read_text())
"""


def test_on_first_process_writes_once_and_others_wait(tmp_path):
    """Two real processes: only process 0 runs the write, and process 1 reads the file only after it exists."""
    from local_processes import run_local_processes

    outputs = run_local_processes(_FIRST_PROCESS_WRITES, str(tmp_path / "written.txt"), timeout=120)
    assert outputs[0].splitlines()[-1] == "0 written 0"
    assert outputs[1].splitlines()[-1] == "1 None 0"  # did not write, yet saw process 0's file


_DECIDE = """
import json, time
from dontstop_jax import distributed
distributed.initialize()
import jax
from dontstop_jax.errors import Fault, UserError
distributed.REPORT_SECONDS = 1
me = jax.process_index()

def refuse():
    raise UserError(f"refused by process {me}")

def slow():
    time.sleep(2.5)  # process 1 reports that it waits
    return {"chosen_by": me, "step": 7}

# a process that builds its backend minutes after the other still joins (jax's own wait is 2 minutes)
out = [[jax.config.jax_cpu_get_local_topology_timeout_minutes, jax.config.jax_cpu_get_global_topology_timeout_minutes]]
try:
    distributed.decide("take the lock", refuse)
except UserError as err:
    out.append(str(err))
out.append(distributed.decide("choose", slow))
if me == 1:  # process 0 never answers this one
    try:
        distributed.decide("never", lambda: None, timeout=2)
    except Fault as err:
        out.append(str(err).split(";")[0])
print(json.dumps(out))
"""


def test_decisions_are_made_on_process_0_and_handed_over_with_their_errors(tmp_path):
    """Every process gets process 0's result or its one-line error; a waiting process says what it waits for, and
    gives up after its timeout. Joining, each waits JOIN_MINUTES for the others' devices, not jax's 2 minutes."""
    import json

    from local_processes import run_local_processes

    from dontstop_jax import distributed

    outputs = run_local_processes(_DECIDE, timeout=120)
    first, second = (json.loads(out.splitlines()[-1]) for out in outputs)
    assert first == [
        [distributed.JOIN_MINUTES, distributed.JOIN_MINUTES + 1],
        "refused by process 0",
        {"chosen_by": 0, "step": 7},
    ]
    assert second == first + ["waited 2 s for process 0 to never"]


_COMPILE_ONE_PROGRAM = """
import json, sys
import numpy as np
from dontstop_jax import runtime
runtime.setup(sys.argv[1])
runtime.HAND_OVER_SECONDS = 3
import jax
from jax._src import compiler
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
compiles, backend_compile = [], compiler.backend_compile_and_load
compiler.backend_compile_and_load = lambda *args, **kwargs: compiles.append(1) or backend_compile(*args, **kwargs)
mesh = Mesh(np.array(jax.devices()), ("all",))
x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("all")), np.ones((1, 64), np.float32))
total = jax.jit(lambda x: (x * 3).sum(0), out_shardings=NamedSharding(mesh, P()))(x)
seen = [len(compiles), float(total.sum())]
if jax.process_index() == 1:
    try:  # the service no longer holds the program once every other process has read it
        seen.append(len(jax._src.distributed.global_state.client.key_value_try_get_bytes("dontstop/program/0")))
    except Exception as err:
        seen.append("deleted" if "NOT_FOUND" in str(err) else str(err))
    # a program over both processes that process 0 never compiles (no collective)
    doubled = jax.jit(lambda x: x * 2)(x)
    seen += [len(compiles), float(doubled.addressable_data(0).sum())]
print(json.dumps(seen))
"""


def test_process_0_compiles_each_program_and_hands_it_to_the_others(tmp_path):
    """A program over every process's devices is compiled by process 0 (or read from its cache) and handed to
    process 1, which compiles nothing; one that process 0 never hands over, process 1 compiles after waiting."""
    import json

    from local_processes import run_local_processes

    runs = [run_local_processes(_COMPILE_ONE_PROGRAM, str(tmp_path)) for _ in range(2)]
    (first0, first1), (again0, again1) = ([json.loads(out.splitlines()[-1]) for out in run] for run in runs)
    assert first0 == [1, 384.0] and again0 == [0, 384.0]  # compiled, then read from process 0's cache
    # handed over, then deleted; the program only it runs: compiled there
    assert first1 == again1 == [0, 384.0, "deleted", 1, 128.0]
