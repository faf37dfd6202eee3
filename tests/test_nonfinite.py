"""A non-finite loss stops the run naming the step, or with train.skip_nonfinite is skipped and counted."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dontstop_jax.engine import StepSpec, TrainState, make_train_step
from dontstop_jax.errors import UserError
from dontstop_jax.train import MetricsWriter, ProgressBar
from dontstop_jax.train.loop import Report, Saving, StopSignal, run_steps

BAD_STEP, STEPS, LR = 3, 6, 0.1


def _linear_loss(params, batch, rng, deterministic):
    """loss = x . w, so the gradient is x: NaN in x poisons loss and gradient at that step only."""
    return jnp.sum(batch["x"] * params["w"]), {"weight": jnp.ones(()), "correct": jnp.zeros(())}


def _batches():
    xs = np.arange(1.0, 1.0 + 3 * STEPS).reshape(STEPS, 3)
    xs[BAD_STEP - 1, 1] = np.nan  # step s consumes xs[s - 1]
    return xs


def _run(tmp_path, skip: bool):
    tx = optax.sgd(LR)
    params = {"w": jnp.ones(3)}
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        rng=jax.random.key_data(jax.random.key(0)),
    )
    step = jax.jit(make_train_step(StepSpec(_linear_loss, tx, skip_nonfinite=skip)))
    with MetricsWriter(tmp_path) as writer:
        state, _ = run_steps(
            state,
            step,
            iter({"x": jnp.asarray(x)} for x in _batches()),
            start=0,
            stop=STEPS,
            tokens_per_step=0,
            report=Report(writer, ProgressBar(STEPS, enabled=False), 1),
            saving=Saving(StopSignal()),
        )
    return state


def test_nonfinite_loss_is_an_error_naming_the_step(tmp_path):
    with pytest.raises(UserError, match=f"at step {BAD_STEP};.*train.skip_nonfinite"):
        _run(tmp_path, skip=False)


def test_skip_nonfinite_keeps_the_old_state_and_counts(tmp_path):
    state = _run(tmp_path, skip=True)
    xs = _batches()
    good = np.delete(xs, BAD_STEP - 1, axis=0)
    np.testing.assert_allclose(state.params["w"], 1.0 - LR * good.sum(0), rtol=1e-6)  # SGD over good steps only
    assert int(state.step) == STEPS
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["skipped"] for m in lines] == [0, 0, 1, 1, 1, 1]  # running count
    assert np.isnan(lines[BAD_STEP - 1]["loss"])
