"""Orbax checkpoints that bridge phases (DAPT -> TAPT -> fine-tune) and survive interruption.

A checkpoint step holds four items, so each consumer reads only what it needs:
- `params`: the model parameters (what the next phase or an export reads),
- `train`: step, optimizer state and RNG (what a resumed run of the same phase reads),
- `data`: the loader's position (JSON), so a resumed run continues the data order exactly,
- `meta`: provenance (JSON): phase, parent checkpoint, config, model config, tokenizer, step,
and one item per parameter average the state keeps (`ema`, `swa`, `teacher`: engine/state.py AVERAGES). A phase
that reports an average (a fine-tune with `averaging`) names it in meta as `weights`; what the next phase or an
export reads (`read`) is then that average.
Orbax writes each step into a temporary directory and renames it when complete, so a save interrupted
half-way is never taken as the latest. Restores take target shardings, so any mesh can read any checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar, cast

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import multihost
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from dontstop_jax import files
from dontstop_jax.distributed import all_codes, decide
from dontstop_jax.engine.state import AVERAGES, TrainState
from dontstop_jax.errors import UserError

log = logging.getLogger(__name__)
T = TypeVar("T")
RETRY_SECONDS = 1.0  # a failed read is tried once more after this pause (a bucket's transient error)


def first_best(scores: Iterable[tuple[int, float | None]], mode: str = "max") -> int | None:
    """The key of the best of the (key, score) pairs, in order; ties go to the earliest (a later score must be
    strictly better). The one rule for "best" that fine-tuning's early stopping and summary and the checkpoint
    it keeps share. None scores are skipped; None when there is no score."""
    best_key, best = None, None
    for key, score in scores:
        if score is not None and (best is None or (score > best if mode == "max" else score < best)):
            best_key, best = key, score
    return best_key


@dataclasses.dataclass
class _FirstBest(pp.PreservationPolicy):
    """Keeps the step `first_best` picks by `metric` (orbax's BestN keeps the *last* of tied steps)."""

    metric: str
    mode: str

    def should_preserve(self, checkpoints: Sequence[Any], *, context: Any) -> list[bool]:
        best = first_best(((c.step, (c.metrics or {}).get(self.metric)) for c in checkpoints), self.mode)
        return [c.step == best for c in checkpoints]


def _reason(err: Exception) -> str:
    return f"{type(err).__name__}: {err}".replace("\n", " ")[:200]


class Checkpointer:
    """Keeps the last `keep_last` steps (so always the latest: a phase's final model) plus the best by
    `best_metric` (when given; `first_best`). A save at a step already kept replaces it.

    Reads without an explicit step survive a damaged step (a file truncated by a full disk, a lost file): they
    fall back to the newest readable other step with a warning, and the next save of the bad step replaces it.
    An explicitly requested step that is unreadable is a one-line error naming the readable ones.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        keep_last: int = 2,
        best_metric: str | None = None,
        best_mode: str = "max",
        async_save: bool = True,
        read_only: bool = False,
    ):
        if best_mode not in ("max", "min"):
            raise UserError(f"best_mode={best_mode!r} must be 'max' or 'min'")
        if keep_last < 1:
            raise UserError(f"keep_last={keep_last} must be >= 1: the latest step holds the phase's final model")
        policies: list[pp.PreservationPolicy] = [pp.LatestN(keep_last)]
        if best_metric is not None:
            policies.append(_FirstBest(best_metric, best_mode))
        # A read-only checkpointer reads on each process alone (with no barrier, so a read that fails on one
        # process leaves the others' collectives in step); the choice of step is still made once (`_read`).
        me = jax.process_index()
        alone = ocp.options.MultiprocessingOptions(
            primary_host=me, active_processes={me}, barrier_sync_key_prefix=f"read-{me}"
        )
        options = ocp.CheckpointManagerOptions(  # best_fn: orbax writes the metrics only when it is set
            preservation_policy=pp.AnyPreservationPolicy(policies),
            enable_async_checkpointing=async_save,
            read_only=read_only,
            create=not read_only,
            best_fn=(lambda m: m[best_metric]) if best_metric else None,
            best_mode=best_mode,
            **({"multiprocessing_options": alone} if read_only else {}),
        )
        self._joins_barriers = jax.process_count() > 1 and not read_only
        self.directory = files.path(files.absolute(directory))
        self.best_metric, self.best_mode = best_metric, best_mode
        handlers = {
            "params": ocp.StandardCheckpointHandler(),
            "train": ocp.StandardCheckpointHandler(),
            "data": ocp.JsonCheckpointHandler(),
            "meta": ocp.JsonCheckpointHandler(),
            **{name: ocp.StandardCheckpointHandler() for name in AVERAGES},
        }
        with files.naming(self.directory):
            self._manager = ocp.CheckpointManager(self.directory, item_handlers=handlers, options=options)
        self._unreadable: set[int] = set()

    # -- writing --------------------------------------------------------------------------------
    def save(self, state: TrainState, *, data_state: dict | None, meta: dict, metrics: dict | None = None) -> None:
        step = int(jax.device_get(state.step))
        # Replace a step already there: the corrupt one a fallback restore skipped, or one saved before what this
        # save adds (a fine-tune stopped at an epoch's last step checkpoints before that epoch's evaluation).
        if step in self._unreadable or step in self._manager.all_steps():  # every process saved the same steps
            self._manager.delete(step)
            self._unreadable.discard(step)
        train = {"step": state.step, "opt_state": state.opt_state, "rng": state.rng}
        with files.naming(self.directory / str(step)):  # tensorstore retries its own requests with backoff
            self._manager.save(
                step,
                metrics=metrics,
                force=True,
                args=ocp.args.Composite(
                    params=ocp.args.StandardSave(state.params),
                    train=ocp.args.StandardSave(train),
                    data=ocp.args.JsonSave(data_state or {}),
                    meta=ocp.args.JsonSave({**meta, "step": step}),
                    **{name: ocp.args.StandardSave(tree) for name, tree in state.averages.items()},
                ),
            )

    def wait(self) -> None:
        """Block until pending asynchronous saves are on disk (call before exiting)."""
        with files.naming(self.directory):
            self._manager.wait_until_finished()

    def close(self) -> None:
        self.wait()
        self._manager.close()

    # -- reading --------------------------------------------------------------------------------
    # Which step a read takes is decided once, on process 0, and every fallback is agreed by all processes, so a
    # transient error on one host (or a bucket listing one host sees late) cannot make hosts restore different steps.
    def latest_step(self) -> int | None:
        return decide(f"latest step of {self.directory}", self._manager.latest_step, timeout=600)

    def best_step(self) -> int | None:
        """The first best step by `best_metric`; without one (or before any step has a metric), the latest."""
        if self.best_metric is None:
            return self.latest_step()
        best = first_best(
            ((s, (self._manager.metrics(s) or {}).get(self.best_metric)) for s in self.all_steps()), self.best_mode
        )
        if best is None:
            return self.latest_step()
        return decide(f"best step of {self.directory}", lambda: best, timeout=600)

    def all_steps(self) -> list[int]:
        return decide(f"steps of {self.directory}", lambda: sorted(self._manager.all_steps()), timeout=600)

    def _step(self, step: int | None) -> int:
        step = self.latest_step() if step is None else step
        if step is None or step not in self.all_steps():
            raise UserError(
                f"no checkpoint{'' if step is None else f' at step {step}'} in {self.directory}; "
                "run the phase first or point to a directory that holds one"
            )
        return step

    def _read(self, read: Callable[[int], T], step: int | None, *, first: int | None = None) -> T:
        """read(`step`); without one, read(`first`, default the latest) or, past each unreadable step with a
        warning, of the newest readable other step."""
        if step is not None:
            step = self._step(step)
            value, err = self._attempt(read, step)
            if err is None:
                return cast(T, value)  # _attempt's value is read's where there is no error
            readable = [s for s in self.all_steps() if s != step and self._attempt(read, s)[1] is None]
            raise UserError(
                f"checkpoint step {step} in {self.directory} is unreadable ({_reason(err)}); "
                f"readable steps: {', '.join(map(str, readable)) or 'none'}"
            ) from err
        first = self._step(first)
        steps = [first] + [s for s in reversed(self.all_steps()) if s != first]
        failed: Exception | None = None
        for i, tried in enumerate(steps):
            if failed is not None:
                log.warning(
                    "checkpoint step %d in %s is unreadable (%s); restoring step %d instead",
                    steps[i - 1],
                    self.directory,
                    _reason(failed),
                    tried,
                )
            value, failed = self._attempt(read, tried)
            if failed is None:
                return cast(T, value)
            self._unreadable.add(tried)
        assert failed is not None  # `steps` is never empty
        raise UserError(
            f"no readable checkpoint in {self.directory}: steps {', '.join(map(str, steps))} are all "
            f"unreadable ({_reason(failed)})"
        ) from failed

    def _attempt(self, read: Callable[[int], T], step: int) -> tuple[T | None, Exception | None]:
        """(read(`step`), None) where it succeeds on every process, tried a second time by all of them after a
        pause; else (None, this process's error, or one naming the process that failed). A bucket that kept
        failing on any process is no reason to fall back to an older step: every process raises `BucketFault`."""
        for attempt in range(2):
            try:
                value, err = read(step), None
            except Exception as e:  # noqa: BLE001 (orbax/tensorstore raise many types for a damaged step)
                value, err = None, e
            codes = all_codes(0 if err is None else 2 if files.bucket_cause(err) else 1)
            if not any(codes):
                return value, None
            if attempt == 0:
                time.sleep(RETRY_SECONDS)
        if 2 in codes:
            cause = files.bucket_cause(err) if err is not None else f"process {codes.index(2)} could not reach it"
            raise files.BucketFault(self.directory / str(step), cause or "a read failed") from err
        others = [p for p, code in enumerate(codes) if code and p != jax.process_index()]
        return None, err or RuntimeError(f"process {others[0]} could not read it; its log has the error")

    def _restore(self, step: int, args: ocp.args.Composite) -> Any:
        """The manager's restore. Orbax ends a restore with a barrier of all processes (unless read-only); where
        the read fails on this process, it joins that barrier anyway, so the processes' collectives stay paired."""
        try:
            return self._manager.restore(step, args=args)
        except Exception:
            if self._joins_barriers:
                prefix = self._manager._checkpointer._barrier_sync_key_prefix  # noqa: SLF001 (orbax's own name)
                multihost.sync_global_processes(multihost.unique_barrier_key("Checkpointer:restore", prefix=prefix))
            raise

    def _meta(self, step: int) -> dict:
        return dict(self._restore(step, ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])

    def _params(self, step: int, abstract_params: Any, item: str = "params") -> Any:
        """The parameters (`item` "params") or one of their averages (an item of AVERAGES) of `step`."""
        to_host = abstract_params is None
        if to_host:  # every process reads the whole tree onto its first local device, then to numpy
            local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            abstract_params = jax.tree_util.tree_map(
                lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=local),
                self._manager.item_metadata(step)[item],
                is_leaf=lambda m: hasattr(m, "shape"),
            )
        params = self._restore(step, ocp.args.Composite(**{item: ocp.args.StandardRestore(abstract_params)}))[item]
        return jax.tree_util.tree_map(np.asarray, params) if to_host else params

    def meta(self, step: int | None = None) -> dict:
        """The provenance of `step`, else of the best step (`best_step`; falls back past unreadable steps)."""
        return self._read(self._meta, step, first=self.best_step())

    def restore(self, abstract: TrainState, step: int | None = None) -> tuple[TrainState, dict, dict]:
        """Full state onto the shardings carried by `abstract` (ShapeDtypeStructs), plus data state and meta:
        of `step`, else of the latest step (falls back past unreadable steps, as a resumed run needs)."""
        train_abstract = {"step": abstract.step, "opt_state": abstract.opt_state, "rng": abstract.rng}
        args = ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract.params),
            train=ocp.args.StandardRestore(train_abstract),
            data=ocp.args.JsonRestore(),
            meta=ocp.args.JsonRestore(),
            **{name: ocp.args.StandardRestore(tree) for name, tree in abstract.averages.items()},
        )
        out = self._read(lambda s: self._restore(s, args), step)
        train = out["train"]
        state = TrainState(
            step=train["step"],
            params=out["params"],
            opt_state=train["opt_state"],
            rng=train["rng"],
            averages={name: out[name] for name in abstract.averages},
        )
        return state, dict(out["data"] or {}), dict(out["meta"])

    def restore_params(self, step: int | None = None, abstract_params: Any = None, item: str = "params") -> Any:
        """Parameters (or the average `item`) of `step`, else of the best step (`best_step`; falls back past
        unreadable steps): onto `abstract_params` shardings, or as host numpy arrays when None.

        Host numpy is what a *different* phase needs: its model may differ in heads (MLM -> classifier),
        and `create_train_state(pretrained=...)` places the arrays onto that phase's own mesh.
        """
        return self._read(lambda s: self._params(s, abstract_params, item), step, first=self.best_step())

    def read(self, step: int | None = None, *, first: int | None = None) -> tuple[int, dict, Any]:
        """(step, meta, host numpy params) of one step: `step`, else `first` (default `best_step`) falling back
        past unreadable steps. What an export or the next phase reads: the weights the phase reported (meta's
        `weights`, e.g. a fine-tune's EMA), else its parameters."""

        def read(s: int) -> tuple[int, dict, Any]:
            meta = self._meta(s)
            return s, meta, self._params(s, None, meta.get("weights", "params"))

        return self._read(read, step, first=self.best_step() if first is None else first)
