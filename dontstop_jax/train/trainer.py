"""The Trainer: everything a training phase needs besides its data and its loss, built in one place.

A phase (phases/pretrain.py, phases/finetune.py) is a recipe: it resolves its starting weights, builds its
batches and its model, and hands both to a Trainer, which owns the mesh and sharding rules, the sharded
train state (resumed from the workdir's newest checkpoint), the checkpointer, the compiled train step, the
step loop with metrics, progress and preemption, and the workdir contract (recorded config, completion
marker). An interrupted phase raises `Interrupted` after its checkpoint and never writes its marker, so
nothing downstream can take a partial phase for a finished one.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from ml_collections import ConfigDict

from dontstop_jax import files
from dontstop_jax.distributed import on_first_process
from dontstop_jax.engine import (
    StepSpec,
    abstract_state,
    check_batch_size,
    compile_train_step,
    create_train_state,
    make_mesh,
    to_global,
)
from dontstop_jax.engine.checkpoint import Checkpointer
from dontstop_jax.engine.peft import Adaptation
from dontstop_jax.engine.steps import Fixed, Hooks, LossSums
from dontstop_jax.errors import Interrupted
from dontstop_jax.model.peft import save_delta
from dontstop_jax.train import source as sources
from dontstop_jax.train.logging import MetricsWriter, ProgressBar
from dontstop_jax.train.loop import Report, Saving, StopSignal, run_steps
from dontstop_jax.train.workdir import Workdir

log = logging.getLogger(__name__)
PEFT_FILE = "peft.safetensors"
# (model, sharded params) -> (loss_sums, step hooks): what a phase trains, e.g. DAS's objective (das/); a `Fixed`
# loss (EWC, DER++) carries the arrays it reads into the compiled step.
Objective = Callable[[nn.Module, Any], tuple[LossSums | Fixed, Hooks]]


@dataclasses.dataclass(frozen=True)
class Averaging:
    """The parameter averages the train state keeps, {name: per-step EMA decay, or None for one the phase updates
    itself (SWA)}; `teacher`: the one the loss reads (StepSpec); `weights`: what the phase reports, "params" or an
    average (recorded in every checkpoint's meta, so the next phase and an export read it)."""

    decays: Mapping[str, float | None] = dataclasses.field(default_factory=dict)
    teacher: str | None = None
    weights: str = "params"


def check_batch(cfg: ConfigDict) -> None:
    """`train.batch_size` must split into `train.accum_steps` micro-batches that spread evenly over the
    configured mesh's data-parallel devices: checked before a phase reads any data."""
    check_batch_size(
        cfg.train.batch_size,
        make_mesh(cfg.mesh.shape, dcn_shape=cfg.mesh.dcn_shape),
        "train.batch_size",
        accum_steps=cfg.train.get("accum_steps", 1),
    )


class Trainer:
    """Train `model` from `source` under `cfg` (its mesh, optim, train, checkpoint, seed, workdir, name).
    Use it as a context manager: leaving it waits for pending checkpoint writes, whatever happened."""

    def __init__(
        self,
        cfg: ConfigDict,
        source: sources.ModelSource,
        adaptation: Adaptation,
        model: nn.Module,
        objective: Objective,
        *,
        total_steps: int,
        best_metric: str | None = None,
        keep_last: int = 2,
        averaging: Averaging = Averaging(),
        **provenance: Any,
    ):
        self.cfg, self.name, self.workdir = cfg, cfg.name, files.path(cfg.workdir)
        self.adaptation, self.model, self.total_steps = adaptation, model, total_steps
        self.averages, self.weights = dict(averaging.decays), averaging.weights
        self.lead = jax.process_index() == 0
        self.mesh = make_mesh(cfg.mesh.shape, dcn_shape=cfg.mesh.dcn_shape)
        self.rules = tuple(tuple(r) for r in cfg.mesh.rules)
        self.tx, schedule = adaptation.optimizer(cfg.optim, total_steps)
        self.state, self.shardings = create_train_state(
            model,
            self.tx,
            self.mesh,
            self.rules,
            cfg.seed,
            pretrained=source.params,
            allow_replicated=cfg.mesh.get("allow_replicated", False),
            averages=tuple(self.averages),
        )
        self.checkpoints = Checkpointer(self.workdir / "checkpoints", keep_last=keep_last, best_metric=best_metric)
        self.meta = sources.provenance(
            self.name, source, cfg, **provenance, **({"weights": self.weights} if self.weights != "params" else {})
        )
        self.data_state: dict | None = None  # the loader position of the restored checkpoint
        self.skipped = 0  # steps skipped for a non-finite loss (train.skip_nonfinite), across resumes
        if self.checkpoints.latest_step() is not None:  # resume exactly where the last checkpoint left off
            self.state, self.data_state, _ = self.checkpoints.restore(self.abstract())
            self.skipped = int(self.data_state.pop("skipped_steps", 0))
        loss_sums, hooks = objective(model, self.state.params)
        spec = StepSpec.for_phase(
            cfg,
            loss_sums,
            self.tx,
            schedule,
            jax.default_backend(),
            adaptation.hooks(),
            hooks,
            teacher=averaging.teacher,
            ema_decays={name: decay for name, decay in self.averages.items() if decay is not None},
        )
        self.train_step = compile_train_step(spec, self.shardings, self.mesh, self.rules)
        self.stop = StopSignal()
        self.writer = MetricsWriter(self.workdir, enabled=self.lead, resume_step=self.step)
        self.progress = ProgressBar(total_steps, enabled=self.lead, desc=self.name)

    def __enter__(self) -> Trainer:
        self.stop.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.close()
        self.writer.close()
        self.checkpoints.close()
        self.stop.__exit__(*exc)

    @property
    def step(self) -> int:
        return int(jax.device_get(self.state.step))

    def abstract(self) -> Any:
        """The state's shapes and target shardings: what a restore places arrays onto."""
        return abstract_state(self.shardings, self.model, self.tx, tuple(self.averages))

    def restart_from(self, params: Any) -> None:
        """Train from `params` instead (e.g. re-initialised top layers); the averages restart there too (as copies:
        the train step donates every buffer of the state)."""
        self.state = self.state.replace(
            params=params, averages={name: jax.tree_util.tree_map(jnp.copy, params) for name in self.averages}
        )

    @property
    def reported(self) -> Any:
        """The weights the phase evaluates and reports (`weights`): the parameters or one of their averages."""
        return self.state.params if self.weights == "params" else self.state.averages[self.weights]

    def fit(
        self,
        batches: Iterator[dict],
        stop: int,
        *,
        data_state: Callable[[int], dict],
        tokens_per_step: int | Callable[[Any], int],
        save_every: int = 0,
    ) -> None:
        """Train to step `stop` on this host's `batches`. When asked to stop (also before the first step),
        checkpoint with `data_state(step)` (the data position after that step) and raise `Interrupted`."""

        def save(state, skipped):
            self.skipped = skipped
            self._save(state, data_state(int(jax.device_get(state.step))))

        if StopSignal.agreed_now():
            raise Interrupted(self.name, self.step)
        self.state, self.skipped = run_steps(
            self.state,
            self.train_step,
            (to_global(b, self.mesh) for b in batches),
            start=self.step,
            stop=stop,
            tokens_per_step=tokens_per_step,
            report=Report(self.writer, self.progress, self.cfg.train.log_every),
            saving=Saving(self.stop, self.name, save, save_every, self.cfg.train.stop_poll_every),
            skipped=self.skipped,
        )

    def save(self, data_state: dict, metrics: dict | None = None) -> None:
        self._save(self.state, data_state, metrics)

    def _save(self, state: Any, data_state: dict, metrics: dict | None = None) -> None:
        """The data state carries the skipped-step count, so a resumed run's summary counts the whole phase."""
        self.checkpoints.save(
            state, data_state={**data_state, "skipped_steps": self.skipped}, meta=self.meta, metrics=metrics
        )

    def finish(self, summary: dict, data_state: dict | None = None) -> dict:
        """Checkpoint the final state, leave a parameter-efficient phase's small file (`PEFT_FILE`), and mark
        the phase finished with `summary` plus `skipped_steps`: the last thing a phase does."""
        if self.checkpoints.latest_step() != self.step:
            self.save(data_state if data_state is not None else self.data_state or {})
        self.checkpoints.wait()
        if self.adaptation.method not in ("full", "top_k"):
            params = self.checkpoints.restore_params(item=self.weights)  # the best step (fine-tuning), else latest
            on_first_process(
                "peft_file",
                lambda: save_delta(
                    self.workdir / PEFT_FILE, params, self.adaptation.trainable(params), self.model.config
                ),
            )
        if self.skipped > 0.01 * self.step:
            log.warning(
                "%s skipped %d of its %d steps for a non-finite loss or gradients (train.skip_nonfinite); "
                "its model may be poor: lower the learning rate, use float32 or check the data",
                self.name,
                self.skipped,
                self.step,
            )
        return Workdir(self.cfg).complete({**summary, "skipped_steps": self.skipped})
