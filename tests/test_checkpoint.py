"""Orbax checkpoints: restore onto any mesh, keep-last + keep-best, provenance, params-only reads."""

import jax
import numpy as np
import pytest

from dontstop_jax.engine import (
    DEFAULT_RULES,
    abstract_state,
    create_train_state,
    default_optim_config,
    make_mesh,
    make_optimizer,
)
from dontstop_jax.engine.checkpoint import Checkpointer
from dontstop_jax.errors import UserError
from dontstop_jax.model import RobertaForMaskedLM, tiny_config

CFG = tiny_config(vocab_size=128, hidden_size=32, intermediate_size=64, max_position_embeddings=34)
MODEL = RobertaForMaskedLM(CFG)
TX, _ = make_optimizer(default_optim_config(), 10)


def _state(mesh_shape, devices, seed=0):
    mesh = make_mesh(mesh_shape, devices)
    return create_train_state(MODEL, TX, mesh, DEFAULT_RULES, seed=seed)


def _assert_trees_equal(a, b):
    jax.tree_util.tree_map(
        lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), jax.device_get(a), jax.device_get(b)
    )


def test_written_on_2x2x2_restores_on_8x1x1_and_one_device(tmp_path):
    state, _ = _state((2, 2, 2), jax.devices(), seed=3)
    ckpt = Checkpointer(tmp_path / "ckpt")
    ckpt.save(state, data_state={"epoch": 1, "batch_in_epoch": 7}, meta={"phase": "dapt", "parent": None})
    ckpt.close()
    for shape, devices in [((8, 1, 1), jax.devices()), ((1, 1, 1), jax.devices()[:1])]:
        _, shardings = _state(shape, devices)
        restored, data, meta = Checkpointer(tmp_path / "ckpt", read_only=True).restore(
            abstract_state(shardings, MODEL, TX)
        )
        _assert_trees_equal(restored, state)
        assert (
            restored.params["roberta"]["layers"]["query"]["kernel"].sharding
            == shardings.params["roberta"]["layers"]["query"]["kernel"]
        )
        assert data == {"epoch": 1, "batch_in_epoch": 7}
        assert meta["phase"] == "dapt" and meta["step"] == 0


def test_keeps_last_n_plus_best(tmp_path):
    state, _ = _state((-1, 1, 1), jax.devices()[:2])
    ckpt = Checkpointer(tmp_path / "ckpt", keep_last=2, best_metric="dev_f1", best_mode="max")
    for step, f1 in zip(range(1, 6), [0.5, 0.9, 0.6, 0.7, 0.4]):
        ckpt.save(state.replace(step=np.int32(step)), data_state=None, meta={}, metrics={"dev_f1": f1})
    ckpt.wait()
    assert ckpt.all_steps() == [2, 4, 5] and ckpt.best_step() == 2 and ckpt.latest_step() == 5
    ckpt.close()


def test_params_only_restore_as_numpy_for_the_next_phase(tmp_path):
    state, _ = _state((-1, 1, 1), jax.devices()[:2], seed=5)
    ckpt = Checkpointer(tmp_path / "ckpt")
    ckpt.save(state, data_state=None, meta={"phase": "tapt"})
    ckpt.close()
    params = Checkpointer(tmp_path / "ckpt", read_only=True).restore_params()
    assert isinstance(params["roberta"]["layers"]["key"]["kernel"], np.ndarray)
    _assert_trees_equal(params, state.params)


def test_half_written_step_is_not_taken_as_latest(tmp_path):
    state, _ = _state((-1, 1, 1), jax.devices()[:2])
    ckpt = Checkpointer(tmp_path / "ckpt")
    ckpt.save(state.replace(step=np.int32(4)), data_state=None, meta={})
    ckpt.close()
    # What an interrupted save leaves behind: a step directory that was never committed (renamed into place).
    (tmp_path / "ckpt" / "9.orbax-checkpoint-tmp-1234" / "params").mkdir(parents=True)
    assert Checkpointer(tmp_path / "ckpt", read_only=True).latest_step() == 4


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="no checkpoint"):
        Checkpointer(tmp_path / "empty").meta()


def test_truncated_latest_step_falls_back_to_the_previous_one(tmp_path, caplog):
    state, shardings = _state((-1, 1, 1), jax.devices()[:2], seed=1)
    ckpt = Checkpointer(tmp_path / "ckpt", keep_last=3)
    for step in (10, 20):
        ckpt.save(state.replace(step=np.int32(step)), data_state={"batch": step}, meta={})
    ckpt.close()
    newest = max(
        (p for p in (tmp_path / "ckpt" / "20" / "train").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size
    )  # the optimizer state's data file
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])

    ckpt = Checkpointer(tmp_path / "ckpt", keep_last=3)
    restored, data, _ = ckpt.restore(abstract_state(shardings, MODEL, TX))
    assert int(restored.step) == 10 and data == {"batch": 10}
    (warning,) = [r.getMessage() for r in caplog.records if r.name == "dontstop_jax.engine.checkpoint"]
    assert "step 20" in warning and "restoring step 10 instead" in warning
    ckpt.save(state.replace(step=np.int32(20)), data_state={"batch": 20}, meta={})  # replaces the bad step
    ckpt.close()
    restored, data, _ = Checkpointer(tmp_path / "ckpt", read_only=True).restore(abstract_state(shardings, MODEL, TX))
    assert int(restored.step) == 20 and data == {"batch": 20}
    _assert_trees_equal(restored.params, state.params)


def test_keep_last_below_one_is_refused(tmp_path):
    with pytest.raises(UserError, match="keep_last=0 must be >= 1"):
        Checkpointer(tmp_path / "ckpt", keep_last=0)


def test_tied_best_keeps_the_first_step(tmp_path):
    state, _ = _state((-1, 1, 1), jax.devices()[:2])
    ckpt = Checkpointer(tmp_path / "ckpt", keep_last=1, best_metric="dev_f1")
    for step, f1 in zip(range(1, 6), [0.5, 0.9, 0.9, 0.4, 0.9]):
        ckpt.save(state.replace(step=np.int32(step)), data_state=None, meta={}, metrics={"dev_f1": f1})
    ckpt.close()
    assert ckpt.all_steps() == [2, 5] and ckpt.best_step() == 2
    assert Checkpointer(tmp_path / "ckpt", read_only=True, best_metric="dev_f1").best_step() == 2


def test_damaged_step_reads_fall_back_unless_the_step_is_named(tmp_path, caplog):
    state, _ = _state((-1, 1, 1), jax.devices()[:2], seed=2)
    ckpt = Checkpointer(tmp_path / "ckpt", keep_last=3)
    for step in (10, 20, 30):
        ckpt.save(state.replace(step=np.int32(step)), data_state=None, meta={"phase": "dapt"})
    ckpt.close()
    for step in (20, 30):
        for path in (tmp_path / "ckpt" / str(step) / "params").rglob("*"):
            if path.is_file():
                path.unlink()
    ckpt = Checkpointer(tmp_path / "ckpt", read_only=True)
    step, meta, params = ckpt.read()
    assert step == meta["step"] == 10
    _assert_trees_equal(params, state.params)
    warnings = [r.getMessage() for r in caplog.records if r.name == "dontstop_jax.engine.checkpoint"]
    assert [w.split(" in ")[0] for w in warnings] == ["checkpoint step 30", "checkpoint step 20"]
    assert "restoring step 20 instead" in warnings[0] and "restoring step 10 instead" in warnings[1]
    with pytest.raises(UserError, match=r"^checkpoint step 30 in .* is unreadable \(.*\); readable steps: 10$"):
        ckpt.restore_params(30)
    for path in (tmp_path / "ckpt" / "10" / "params").rglob("*"):
        if path.is_file():
            path.unlink()
    with pytest.raises(UserError, match=r"^no readable checkpoint in .*: steps 30, 20, 10 are all unreadable"):
        ckpt.restore_params()


def test_padded_vocabulary_checkpoint_restores_into_the_padded_model_and_exports_the_real_one(tmp_path):
    """The meta's model_config carries vocab_pad_multiple, so a checkpoint of a 100-id model (a 128-row table,
    sharded over `tensor`) rebuilds the same 128-row model; export writes the 100 real rows."""
    import dataclasses

    from dontstop_jax.model import ModelConfig, save_pretrained
    from dontstop_jax.model.hf_io import param_shapes

    cfg = CFG.replace(vocab_size=100)
    mesh = make_mesh((2, 1, 2), jax.devices()[:4])
    state, _ = create_train_state(RobertaForMaskedLM(cfg), TX, mesh, DEFAULT_RULES, seed=0)
    table = state.params["roberta"]["embeddings"]["word_embeddings"]["embedding"]
    assert table.shape == (128, 32) and table.sharding.spec[0] == "tensor"
    ckpt = Checkpointer(tmp_path / "ckpt")
    ckpt.save(state, data_state=None, meta={"phase": "dapt", "model_config": dataclasses.asdict(cfg)})
    ckpt.close()
    _, meta, params = Checkpointer(tmp_path / "ckpt", read_only=True).read()
    restored_cfg = ModelConfig(**meta["model_config"])
    assert restored_cfg == cfg
    shapes = param_shapes(RobertaForMaskedLM(restored_cfg))
    jax.tree_util.tree_map(lambda s, p: np.testing.assert_equal(s.shape, np.shape(p)), shapes, params)
    again, _ = create_train_state(RobertaForMaskedLM(restored_cfg), TX, mesh, DEFAULT_RULES, seed=1, pretrained=params)
    _assert_trees_equal(again.params, state.params)
    out = save_pretrained(tmp_path / "hf", restored_cfg, params, "mlm")
    from safetensors.numpy import load_file

    assert load_file(str(out / "model.safetensors"))["lm_head.bias"].shape == (100,)


_HOSTS_READ = """
import sys
from dontstop_jax import distributed
distributed.initialize()
import jax
from dontstop_jax.engine.checkpoint import Checkpointer

failures = {"once": 1, "twice": 2}[sys.argv[2]] if jax.process_index() == 1 else 0

def flaky(ckpt):  # process 1's reads of the latest step fail `failures` times, inside orbax's restore
    restore, left = ckpt._manager.restore, [failures]

    def read(step, *args, **kwargs):
        if step == 20 and left[0]:
            left[0] -= 1
            raise OSError("503 Service Unavailable (injected)")
        return restore(step, *args, **kwargs)
    ckpt._manager.restore = read
    return ckpt

step, meta, _ = flaky(Checkpointer(sys.argv[1], read_only=True)).read()  # reads with no barrier
print("read", step, meta["step"])
params = flaky(Checkpointer(sys.argv[1])).restore_params()  # reads that end in orbax's barrier
print("restored", int(jax.tree_util.tree_leaves(params)[0].flat[0]))  # each step's parameters hold its number
"""


@pytest.mark.parametrize("fails, restored", [("once", 20), ("twice", 10)])
def test_one_hosts_failed_read_leaves_every_host_on_the_same_step(tmp_path, fails, restored):
    """Two real processes: process 1's read of step 20 fails (once: retried; twice: the step counts as unreadable);
    both restore the same step, the one process 0 decided and both could read."""
    from local_processes import run_local_processes

    state, _ = _state((-1, 1, 1), jax.devices()[:2], seed=3)
    ckpt = Checkpointer(tmp_path / "ckpt", keep_last=3)
    for step in (10, 20):
        params = jax.tree_util.tree_map(lambda x, step=step: np.full(x.shape, step, x.dtype), state.params)
        ckpt.save(state.replace(step=np.int32(step), params=params), data_state=None, meta={"phase": "dapt"})
    ckpt.close()
    outputs = run_local_processes(_HOSTS_READ, str(tmp_path / "ckpt"), fails, timeout=180)
    assert [out.splitlines()[-2:] for out in outputs] == [[f"read {restored} {restored}", f"restored {restored}"]] * 2


def test_a_save_at_a_kept_step_replaces_it(tmp_path):
    """A fine-tune stopped at an epoch's last step checkpoints that step before its evaluation; the resumed run's
    save of the same step (now with the epoch's dev score) replaces it."""
    state, shardings = _state((-1, 1, 1), jax.devices()[:1])
    ckpt = Checkpointer(tmp_path / "ckpt", keep_last=1, best_metric="dev_f1")
    ckpt.save(state.replace(step=np.int32(3)), data_state={"epoch": 0}, meta={}, metrics={"dev_f1": 0.7})
    ckpt.save(state.replace(step=np.int32(5)), data_state={"epoch": 0}, meta={})  # the stop, before evaluating
    ckpt.close()
    resumed = Checkpointer(tmp_path / "ckpt", keep_last=1, best_metric="dev_f1")
    resumed.save(state.replace(step=np.int32(5)), data_state={"epoch": 1}, meta={}, metrics={"dev_f1": 0.8})
    resumed.wait()
    assert resumed.all_steps() == [5] and resumed.best_step() == 5
    assert resumed.restore(abstract_state(shardings, MODEL, TX))[1] == {"epoch": 1}
    resumed.close()
