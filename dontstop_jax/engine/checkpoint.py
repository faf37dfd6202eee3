"""Orbax checkpoints that bridge phases (DAPT -> TAPT -> fine-tune) and survive interruption.

A checkpoint step holds four items, so each consumer reads only what it needs:
- `params`: the model parameters (what the next phase or an export reads),
- `train`: step, optimizer state and RNG (what a resumed run of the same phase reads),
- `data`: the loader's position (JSON), so a resumed run continues the data order exactly,
- `meta`: provenance (JSON): phase, parent checkpoint, config, model config, tokenizer, step.
Orbax writes each step into a temporary directory and renames it when complete, so a save interrupted
half-way is never taken as the latest. Restores take target shardings, so any mesh can read any checkpoint.
"""

from __future__ import annotations

import itertools
import logging
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from dontstop_jax.engine.state import TrainState
from dontstop_jax.errors import UserError

log = logging.getLogger(__name__)


class Checkpointer:
    """Keeps the last `keep_last` steps plus the `keep_best` best by `best_metric` (when given)."""

    def __init__(self, directory: str | os.PathLike, *, keep_last: int = 2, best_metric: str | None = None,
                 best_mode: str = "max", keep_best: int = 1, async_save: bool = True, read_only: bool = False):
        if best_mode not in ("max", "min"):
            raise UserError(f"best_mode={best_mode!r} must be 'max' or 'min'")
        policies: list[pp.PreservationPolicy] = [pp.LatestN(keep_last)]
        if best_metric is not None:
            # BestN keeps the n *last* of the metrics sorted ascending (reverse=True flips that order),
            # as tests/test_checkpoint.py::test_keeps_last_n_plus_best pins down.
            policies.append(pp.BestN(get_metric_fn=lambda m: m[best_metric], reverse=best_mode == "min",
                                     n=keep_best, keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=pp.AnyPreservationPolicy(policies), enable_async_checkpointing=async_save,
            read_only=read_only, create=not read_only,
            best_fn=(lambda m: m[best_metric]) if best_metric else None, best_mode=best_mode)
        self.directory = Path(directory).absolute()
        handlers = {"params": ocp.StandardCheckpointHandler(), "train": ocp.StandardCheckpointHandler(),
                    "data": ocp.JsonCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
        self._manager = ocp.CheckpointManager(self.directory, item_handlers=handlers, options=options)
        self._unreadable: set[int] = set()

    # -- writing --------------------------------------------------------------------------------
    def save(self, state: TrainState, *, data_state: dict | None, meta: dict, metrics: dict | None = None) -> None:
        step = int(jax.device_get(state.step))
        if step in self._unreadable:  # the corrupt step a fallback restore skipped: replace it
            self._manager.delete(step)
            self._unreadable.discard(step)
        train = {"step": state.step, "opt_state": state.opt_state, "rng": state.rng}
        self._manager.save(step, metrics=metrics, force=True, args=ocp.args.Composite(
            params=ocp.args.StandardSave(state.params), train=ocp.args.StandardSave(train),
            data=ocp.args.JsonSave(data_state or {}), meta=ocp.args.JsonSave({**meta, "step": step})))

    def wait(self) -> None:
        """Block until pending asynchronous saves are on disk (call before exiting)."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    # -- reading --------------------------------------------------------------------------------
    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def best_step(self) -> int | None:
        return self._manager.best_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def _step(self, step: int | None) -> int:
        step = self.latest_step() if step is None else step
        if step is None or step not in self.all_steps():
            raise UserError(f"no checkpoint{'' if step is None else f' at step {step}'} in {self.directory}; "
                            "run the phase first or point to a directory that holds one")
        return step

    def meta(self, step: int | None = None) -> dict:
        step = self._step(step)
        return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore(self, abstract: TrainState, step: int | None = None) -> tuple[TrainState, dict, dict]:
        """Full state onto the shardings carried by `abstract` (ShapeDtypeStructs), plus data state and meta.

        With step=None an unreadable latest step (e.g. a file truncated by a full disk) falls back to the
        newest older step that reads, with a warning; the next save of the bad step replaces it.
        """
        train_abstract = {"step": abstract.step, "opt_state": abstract.opt_state, "rng": abstract.rng}
        args = ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract.params), train=ocp.args.StandardRestore(train_abstract),
            data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore())
        if step is not None:
            out = self._manager.restore(self._step(step), args=args)
        else:
            out = self._restore_newest_readable(args)
        train = out["train"]
        state = TrainState(step=train["step"], params=out["params"], opt_state=train["opt_state"], rng=train["rng"])
        return state, dict(out["data"] or {}), dict(out["meta"])

    def _restore_newest_readable(self, args: ocp.args.Composite) -> Any:
        steps = sorted(self.all_steps(), reverse=True) or [self._step(None)]  # none: _step raises the error
        for newer, older in itertools.pairwise(steps):
            try:
                return self._manager.restore(newer, args=args)
            except Exception as err:  # noqa: BLE001 (orbax/tensorstore raise many types for a damaged step)
                log.warning("checkpoint step %d in %s is unreadable (%s: %s); restoring step %d instead", newer,
                            self.directory, type(err).__name__, str(err).replace("\n", " ")[:200], older)
                self._unreadable.add(newer)
        return self._manager.restore(steps[-1], args=args)

    def restore_params(self, step: int | None = None, abstract_params: Any = None) -> Any:
        """Parameters only: onto `abstract_params` shardings, or as host numpy arrays when None.

        Host numpy is what a *different* phase needs: its model may differ in heads (MLM -> classifier),
        and `create_train_state(pretrained=...)` places the arrays onto that phase's own mesh.
        """
        step = self._step(step)
        to_host = abstract_params is None
        if to_host:  # every process reads the whole tree onto its first local device, then to numpy
            local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            abstract_params = jax.tree_util.tree_map(
                lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=local),
                self._manager.item_metadata(step)["params"], is_leaf=lambda m: hasattr(m, "shape"))
        params = self._manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_params)))["params"]
        return jax.tree_util.tree_map(np.asarray, params) if to_host else params
