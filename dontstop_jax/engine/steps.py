"""Pure, jittable train and eval steps for MLM and classification.

Losses are returned as *sums* with their weights, so gradient accumulation over k micro-batches is exactly
one batch of k times the size: grads and weights are summed over micro-batches and divided once.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping
from typing import Any, Literal, TypedDict

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dontstop_jax.engine.optim import Schedule
from dontstop_jax.engine.regularizers import Regularizer
from dontstop_jax.engine.sharding import (
    BATCH_AXES,
    Rules,
    activation_rules,
    batch_sharding,
    only_axes,
    put_tree,
    rules_without,
)
from dontstop_jax.engine.state import TrainState, ema_update
from dontstop_jax.errors import UserError

Batch = dict[str, jax.Array]


class Hooks(TypedDict, total=False):
    """make_train_step's per-parameter hooks (keyword arguments of the same names), each tree -> tree."""

    grad_transform: Callable[[Any], Any]
    update_transform: Callable[[Any], Any]


HOOK_NAMES: tuple[Literal["grad_transform", "update_transform"], ...] = ("grad_transform", "update_transform")
# loss_sums(params, batch, dropout_rng, deterministic) -> (weighted loss sum, {"weight": ..., "correct": ...});
# a loss that reads a parameter average (SMART's teacher) takes it as a fifth argument
LossSums = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]


@dataclasses.dataclass(frozen=True)
class Fixed:
    """A loss (and step hooks) over arrays held fixed for a whole phase (EWC's anchor and Fisher, DER++'s replay
    buffer, HAT's past masks, DAS's importance). They reach the compiled step as an argument, placed once: an array
    a jitted function closes over is baked into the program as a constant (a full copy of the parameters in the
    HLO for EWC; for DAS, a new program for every stage of a sequence, since each stage's importance differs). The
    loss also gets the step counter (HAT's annealed gate slope, the multi-task weight's epoch)."""

    loss: Callable[[Any, jax.Array], LossSums]  # (arrays, step) -> the loss that reads them
    arrays: Any  # a tree of jax arrays (placed) or numpy arrays (placed replicated by compile_train_step)
    hooks: Callable[[Any], Hooks] | None = None  # (arrays) -> hooks that read them, applied before StepSpec's


def _nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # float32: bf16 cross-entropy is unstable
    return -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


def mlm_loss_sums(model: nn.Module, gates: Any = None) -> LossSums:
    """Cross-entropy at the masked slots only (`mlm_positions`); unused slots have weight 0."""

    def loss(params, batch, rng, deterministic):
        logits = model.apply(
            {"params": params},
            batch["input_ids"],
            batch["attention_mask"],
            batch["mlm_positions"],
            deterministic=deterministic,
            gates=gates,
            rngs={"dropout": rng},
        )
        w = batch["mlm_weights"].astype(jnp.float32)
        correct = (jnp.argmax(logits, -1) == batch["mlm_ids"]) * w
        return jnp.sum(_nll(logits, batch["mlm_ids"]) * w), {"weight": jnp.sum(w), "correct": jnp.sum(correct)}

    return loss


def classification_loss_sums(model: nn.Module, regularizer: Regularizer | None = None) -> LossSums:
    """Cross-entropy over examples; padding rows of an eval batch have `example_weights` 0. A `regularizer`
    (R3F, SMART: engine/regularizers.py) adds its per-example penalty; SMART's Bregman term reads the mean
    teacher's parameters, the loss's fifth argument (StepSpec's `teacher`)."""

    def loss(params, batch, rng, deterministic, teacher=None):
        def forward(p, noise=None, key=rng, det=None):
            return model.apply(
                {"params": p},
                batch["input_ids"],
                batch["attention_mask"],
                deterministic=deterministic if det is None else det,
                embedding_noise=noise,
                rngs={"dropout": key},
            )

        logits = forward(params)
        w = batch["example_weights"].astype(jnp.float32)
        correct = (jnp.argmax(logits, -1) == batch["labels"]) * w
        per_example = _nll(logits, batch["labels"])
        if regularizer is not None:
            shape = batch["input_ids"].shape + (model.config.hidden_size,)
            per_example = per_example + regularizer.penalty(forward, params, logits, shape, rng, teacher)
        return jnp.sum(per_example * w), {"weight": jnp.sum(w), "correct": jnp.sum(correct)}

    return loss


def hold_fixed(paths: tuple[str, ...]) -> Hooks:
    """Hooks that keep the parameters under any of `paths` ("lm_head", "roberta/embeddings") exactly where they
    are: their gradients (so they take no share of clipping) and their updates (so no weight decay) are zeroed."""
    if not paths:
        return {}

    def zero(tree: Any) -> Any:
        def one(path, x):
            name = "/".join(str(k.key) for k in path)
            return x * 0 if any(name == p or name.startswith(p + "/") for p in paths) else x

        return jax.tree_util.tree_map_with_path(one, tree)

    return {"grad_transform": zero, "update_transform": zero}


def chain_hooks(*hooks: Hooks) -> Hooks:
    """One set of step hooks that applies each given set's in turn (PEFT's frozen slices and layer-wise
    learning rates, DAS soft-masks, parameters a recipe holds fixed): they all scale slices, so they compose."""
    chained: Hooks = {}
    for name in HOOK_NAMES:
        fns = [h[name] for h in hooks if h.get(name) is not None]
        if fns:
            chained[name] = functools.reduce(lambda f, g: lambda tree: g(f(tree)), fns)
    return chained


def _micro_batches(batch: Batch, k: int) -> Batch:
    """[k*b, ...] -> [k, b, ...] (row r -> micro-batch r % k): on one device's rows this is its share of the
    global batch's micro-batches, since each device holds a multiple of k consecutive rows."""
    return jax.tree_util.tree_map(lambda x: x.reshape((x.shape[0] // k, k) + x.shape[1:]).swapaxes(0, 1), batch)


def _accumulate(
    grad_fn: Callable,
    params: Any,
    batch: Batch,
    rng: jax.Array,
    extra: tuple,
    accum_steps: int,
    gather: Callable[[Any, Any], Any],
) -> tuple:
    """(loss sum, aux sums, float32 gradient sum) over the micro-batches of `batch`, with no reduction across
    devices. `gather(params, micro-batch)` makes the parameters the loss reads (an FSDP all-gather, or nothing):
    the gradient is taken after it, so its transpose (a reduce-scatter) never runs per micro-batch."""

    def one(micro, key):
        (loss_sum, a), g = grad_fn(gather(params, micro), micro, key, *extra)
        return loss_sum, a, jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), g)

    if accum_steps == 1:
        return one(batch, rng)

    def body(carry, xs):
        i, micro = xs
        return jax.tree_util.tree_map(jnp.add, carry, one(micro, jax.random.fold_in(rng, i))), None

    micro = _micro_batches(batch, accum_steps)
    shapes = jax.eval_shape(one, jax.tree_util.tree_map(lambda x: x[0], micro), rng)
    zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    return jax.lax.scan(body, zeros, (jnp.arange(accum_steps), micro))[0]


def _split_dim(spec: P) -> tuple[int | None, tuple[str, ...]]:
    """(the dimension a batch-axes-only spec splits, its axes), or (None, ()) for a leaf replicated over them."""
    for dim, entry in enumerate(spec):
        if entry is not None:
            return dim, ((entry,) if isinstance(entry, str) else tuple(entry))
    return None, ()


def _gather(x: jax.Array, spec: P) -> jax.Array:
    dim, axes = _split_dim(spec)
    return x if dim is None else jax.lax.all_gather(x, axes, axis=dim, tiled=True)


def _reduce(g: jax.Array, spec: P, dtype: Any) -> jax.Array:
    """A leaf's one gradient reduction over the batch axes, in `dtype`: a reduce-scatter over the axes its
    parameter is split over (FSDP), an all-reduce over the others (data parallelism)."""
    dim, axes = _split_dim(spec)
    g = g.astype(dtype)
    if dim is not None:
        g = jax.lax.psum_scatter(g, axes, scatter_dimension=dim, tiled=True)
    rest = tuple(a for a in BATCH_AXES if a not in axes)
    return (jax.lax.psum(g, rest) if rest else g).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """What a train step does (make_train_step). `loss`: plain, or `Fixed` (its arrays are among the step's
    `arguments`). `hooks`: `grad_transform` maps the gradients before clipping and the optimizer (zero frozen
    slices, DAS soft-masks), `update_transform` scales the optimizer's output (layer-wise learning rates; DAS
    again, since Adam normalises away a constant gradient scale); several sources of hooks combine with
    `chain_hooks`.

    `accum_steps` micro-batches per step; `grad_reduce_dtype` and `gather_params_once`: how the gradients are
    reduced and the parameters gathered (make_train_step). `skip_nonfinite`: a step whose loss or gradient norm
    is not finite keeps the old parameters and optimizer state (one bad batch need not end a long run) and
    reports `skipped` = 1; the step counter still advances. `schedule`: the learning rate `tx` follows
    (make_optimizer returns both), logged as `learning_rate`; its numbers are among the `arguments`.

    `ema_decays`: {name: decay} of the state's parameter averages updated after every step (an EMA of the
    fine-tuned weights, SMART's mean teacher); the state's other averages are left to the phase (SWA).
    `teacher`: the name of the average the loss reads as its fifth argument (SMART's Bregman term)."""

    loss: LossSums | Fixed
    tx: optax.GradientTransformation
    accum_steps: int = 1
    schedule: Schedule | None = None
    hooks: Hooks = dataclasses.field(default_factory=Hooks)
    skip_nonfinite: bool = False
    ema_decays: Mapping[str, float] = dataclasses.field(default_factory=dict)
    teacher: str | None = None
    grad_reduce_dtype: str = "float32"
    gather_params_once: bool = False

    @classmethod
    def for_phase(
        cls,
        cfg: Any,
        loss: LossSums | Fixed,
        tx: optax.GradientTransformation,
        schedule: Schedule | None,
        platform: str,
        *hooks: Hooks,
        **fields: Any,
    ) -> StepSpec:
        """A phase config's step on devices of `platform`: its `train` section's accumulation, reduction and
        non-finite rule; `hooks` chained with holding its `frozen` paths fixed."""
        dtype = cfg.train.get("grad_reduce_dtype", "float32")
        if dtype == "bfloat16" and platform == "cpu":  # XLA's CPU AllReducePromotion aborts the process on it
            raise UserError("train.grad_reduce_dtype=bfloat16 cannot compile for CPU devices; use float32 on CPU")
        return cls(
            loss,
            tx,
            accum_steps=cfg.train.get("accum_steps", 1),
            schedule=schedule,
            hooks=chain_hooks(*hooks, hold_fixed(tuple(cfg.get("frozen", ())))),
            skip_nonfinite=cfg.train.skip_nonfinite,
            grad_reduce_dtype=dtype,
            gather_params_once=cfg.train.get("gather_params_once", False),
            **fields,
        )

    @property
    def arguments(self) -> dict[str, Any]:
        """The step's third argument (compile_train_step binds it): data the program must not hold as constants.
        "schedule": a `Schedule`'s numbers, so phases that differ only in them share one compiled step; "fixed": a
        `Fixed` loss's arrays."""
        arguments: dict[str, Any] = {}
        if self.schedule is not None:
            arguments["schedule"] = self.schedule.values
        if isinstance(self.loss, Fixed):
            arguments["fixed"] = self.loss.arrays
        return arguments

    def loss_at(self, arguments: Mapping[str, Any], step: jax.Array) -> LossSums:
        """The loss the step differentiates: a `Fixed` one given its arrays (from the step's `arguments`) and the
        step."""
        return self.loss.loss(arguments["fixed"], step) if isinstance(self.loss, Fixed) else self.loss

    def hooks_at(self, arguments: Mapping[str, Any]) -> Hooks:
        """The step's hooks: a `Fixed` loss's (given its arrays), then `hooks`."""
        if isinstance(self.loss, Fixed) and self.loss.hooks is not None:
            return chain_hooks(self.loss.hooks(arguments["fixed"]), self.hooks)
        return self.hooks


def make_train_step(spec: StepSpec) -> Callable[..., tuple]:
    """(state, global batch, spec.arguments) -> (new state, metrics), as `spec` says. Without the arguments a
    `Schedule`'s numbers are constants of the program (and a `Fixed` loss cannot run).

    With several batch shards the gradients are computed in a shard_map over the batch axes (tensor stays
    automatic): each device sums its rows' gradients over the `accum_steps` micro-batches in float32, unreduced,
    and the sum is reduced once after the loop in `grad_reduce_dtype` (bfloat16 halves the bytes and rounds the
    summed gradient), so a step moves one reduction's worth of gradient bytes whatever the accumulation, at the
    memory of one float32 gradient per device. Parameters split over the batch axes (FSDP) are all-gathered for every
    micro-batch, or once before the loop with `gather_params_once` (less traffic; the whole parameters are held
    through the loop). `param_shardings` (compile_train_step passes them) say which are split; without them
    all count as replicated. A device's dropout key is the step's key folded with its batch shard's index, so
    the masks depend on the data-parallel size; a loss's in-batch statistics (DAS's contrast, DER++'s replay
    mean) are per device and micro-batch.
    """
    reduce_dtype = jnp.dtype(spec.grad_reduce_dtype)

    def gradients(params, batch, rng, extra, arguments, step_count, specs=None):
        """(loss sum, aux, gradient sum); with `specs` (inside the shard_map) reduced over the batch axes."""
        loss = spec.loss_at(arguments, step_count)
        grad_fn = jax.value_and_grad(lambda p, b, r, *t: loss(p, b, r, False, *t), has_aux=True)
        if specs is None:  # outside the shard_map
            return _accumulate(grad_fn, params, batch, rng, extra, spec.accum_steps, lambda p, _: p)

        def gather(tree):
            return jax.tree_util.tree_map(_gather, tree, specs)

        def per_micro_batch(p, micro):  # the barrier ties the gather to the micro-batch so XLA cannot hoist it
            return gather(jax.lax.optimization_barrier((p, micro))[0])

        extra = tuple(gather(t) for t in extra)
        each = per_micro_batch
        if spec.gather_params_once:
            params, each = gather(params), (lambda p, _: p)
        rng = jax.random.fold_in(rng, jax.lax.axis_index(BATCH_AXES))
        with nn.logical_axis_rules(rules_without(nn.get_logical_axis_rules(), BATCH_AXES)):
            loss_sum, aux, grads = _accumulate(grad_fn, params, batch, rng, extra, spec.accum_steps, each)
        grads = jax.tree_util.tree_map(lambda g, s: _reduce(g, s, reduce_dtype), grads, specs)
        return jax.lax.psum((loss_sum, aux), BATCH_AXES) + (grads,)

    def step(state: TrainState, batch: Batch, arguments: Mapping[str, Any] | None = None, *, param_shardings=None):
        arguments = arguments or {}
        hooks = spec.hooks_at(arguments)
        grad_transform, update_transform = hooks.get("grad_transform"), hooks.get("update_transform")
        rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        extra = (state.averages[spec.teacher],) if spec.teacher else ()
        args = (state.params, batch, rng, extra, arguments, state.step)
        mesh = jax.sharding.get_abstract_mesh()
        if mesh.empty or math.prod(mesh.shape[a] for a in BATCH_AXES) == 1:  # one batch shard: nothing to reduce
            loss_sum, aux, grads = gradients(*args)
        else:
            specs = (
                jax.tree_util.tree_map(lambda _: P(), state.params)
                if param_shardings is None
                else jax.tree_util.tree_map(lambda s: only_axes(s.spec, BATCH_AXES), param_shardings)
            )
            in_specs = (specs, P(BATCH_AXES), P(), (specs,) * len(extra), P(), P())
            loss_sum, aux, grads = jax.shard_map(
                functools.partial(gradients, specs=specs),
                in_specs=in_specs,
                out_specs=(P(), P(), specs),
                axis_names=set(BATCH_AXES),
                check_vma=False,
            )(*args)
        weight = jnp.maximum(aux["weight"], 1.0)
        grads = jax.tree_util.tree_map(lambda g: g / weight, grads)
        if grad_transform is not None:
            grads = grad_transform(grads)
        updates, opt_state = optax.with_extra_args_support(spec.tx).update(
            grads, state.opt_state, state.params, schedule_values=arguments.get("schedule")
        )
        if update_transform is not None:
            updates = update_transform(updates)
        params = optax.apply_updates(state.params, updates)
        averages = {
            name: ema_update(avg, params, spec.ema_decays[name]) if name in spec.ema_decays else avg
            for name, avg in state.averages.items()
        }
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, averages=averages)
        metrics = {
            "loss": loss_sum / weight,
            "accuracy": aux["correct"] / weight,
            "weight": aux["weight"],
            "grad_norm": optax.tree.norm(grads),
        }
        if spec.skip_nonfinite:
            finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
            keep = functools.partial(jax.tree_util.tree_map, lambda new, old: jnp.where(finite, new, old))
            new_state = new_state.replace(
                params=keep(new_state.params, state.params),
                opt_state=keep(new_state.opt_state, state.opt_state),
                averages=keep(new_state.averages, state.averages),
            )
            metrics["skipped"] = 1.0 - finite.astype(jnp.float32)
        if spec.schedule is not None:
            metrics["learning_rate"] = spec.schedule(state.step, arguments.get("schedule"))
        return new_state, metrics

    return step


def make_eval_step(loss_sums: LossSums) -> Callable[[Any, Batch], dict]:
    """(params, batch) -> summed loss, weight and correct count (divide after summing over batches)."""

    def step(params, batch):
        loss_sum, aux = loss_sums(params, batch, jax.random.key(0), True)
        return {"loss_sum": loss_sum, **aux}

    return step


def _under_mesh(jitted: Callable, mesh: Mesh, rules: Rules) -> Callable:
    """Trace and run `jitted` with the mesh and logical rules active (model activation constraints need both).

    The jitted function stays reachable as `.__wrapped__` (e.g. for `.lower(...).compile().memory_analysis()`).
    """

    @functools.wraps(jitted)
    def call(*args):
        with activation_rules(mesh, rules):
            return jitted(*args)

    return call


def compile_train_step(
    spec: StepSpec, state_shardings: Any, mesh: Mesh, rules: Rules, *, donate: bool = True
) -> Callable[[TrainState, Batch], tuple]:
    """`spec`'s step, jitted with explicit shardings: (state, batch) -> (new state, metrics). The old state's
    buffers are donated to the new one (one copy of the parameters and optimizer state in device memory instead of
    two; `donate=False` only for comparisons). The spec's `arguments` are placed once and passed to every call
    (a `Fixed` loss's arrays sharded as they were placed, the schedule's numbers replicated, at the first call);
    `.__wrapped__` is the jitted function, which takes them as its third argument (the plan lowers it for devices
    it cannot place arrays on)."""
    replicated = NamedSharding(mesh, P())
    shardings = jax.tree_util.tree_map(lambda x: x.sharding if isinstance(x, jax.Array) else replicated, spec.arguments)
    arguments = functools.cache(
        lambda: jax.tree_util.tree_map(
            lambda x, s: x if isinstance(x, jax.Array) else put_tree(x, s), spec.arguments, shardings
        )
    )
    jitted = jax.jit(
        functools.partial(make_train_step(spec), param_shardings=state_shardings.params),
        in_shardings=(state_shardings, batch_sharding(mesh), shardings),
        out_shardings=(state_shardings, replicated),
        donate_argnums=(0,) if donate else (),
    )
    call = _under_mesh(jitted, mesh, rules)
    return functools.wraps(jitted)(lambda state, batch: call(state, batch, arguments()))


def compile_eval_step(step: Callable, param_shardings: Any, mesh: Mesh, rules: Rules) -> Callable:
    jitted = jax.jit(step, in_shardings=(param_shardings, batch_sharding(mesh)), out_shardings=NamedSharding(mesh, P()))
    return _under_mesh(jitted, mesh, rules)


def compile_predict_step(model: nn.Module, param_shardings: Any, mesh: Mesh, rules: Rules) -> Callable:
    """(params, batch) -> (logits, labels, example weights), replicated so every host sees every prediction."""

    def step(params, batch):
        logits = model.apply({"params": params}, batch["input_ids"], batch["attention_mask"], deterministic=True)
        return logits, batch["labels"], batch["example_weights"]

    jitted = jax.jit(step, in_shardings=(param_shardings, batch_sharding(mesh)), out_shardings=NamedSharding(mesh, P()))
    return _under_mesh(jitted, mesh, rules)
