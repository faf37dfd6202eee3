"""The train state: an explicit pytree (params, optimizer state, step, RNG), created directly sharded."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from dontstop_jax.engine.sharding import Rules, check_replicated, put_tree, tree_shardings
from dontstop_jax.model.roberta import init_params

# Averages of the parameters a train state may keep (each one checkpoint item): an EMA or SWA of the fine-tuned
# weights (what a fine-tune with `averaging` evaluates and hands on) and SMART's mean teacher.
AVERAGES = ("ema", "swa", "teacher")


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar
    params: Any
    opt_state: Any
    rng: jax.Array  # uint32[2] raw key: checkpointable as a plain array
    averages: dict = flax.struct.field(default_factory=dict)  # {name in AVERAGES: params-shaped tree}

    if TYPE_CHECKING:  # flax.struct.dataclass adds it at runtime

        def replace(self, **updates: Any) -> TrainState: ...


def ema_update(average: Any, params: Any, decay: float) -> Any:
    """decay * average + (1 - decay) * params, leaf by leaf."""
    return jax.tree_util.tree_map(lambda a, p: decay * a + (1.0 - decay) * p, average, params)


def running_mean(mean: Any, params: Any, count: jax.Array) -> Any:
    """The mean of `count` + 1 trees given the mean of the first `count` (SWA's update; count 0 gives params)."""
    return jax.tree_util.tree_map(lambda m, p: m + (p - m) / (count + 1.0), mean, params)


def _check_averages(averages: tuple[str, ...]) -> tuple[str, ...]:
    if unknown := set(averages) - set(AVERAGES):
        raise ValueError(f"unknown parameter averages {sorted(unknown)}; a train state keeps {AVERAGES}")
    return tuple(averages)


def _merge(fresh: Any, loaded: Any) -> Any:
    """`loaded` overrides `fresh` wherever it has a value (e.g. a pretrained encoder over a new head)."""
    if isinstance(loaded, dict):
        return {k: _merge(v, loaded[k]) if k in loaded else v for k, v in fresh.items()}
    return loaded


def _subtree(tree: Any, like: Any) -> Any:
    """The part of `tree` whose keys also occur in `like`."""
    if isinstance(like, dict):
        return {k: _subtree(tree[k], v) for k, v in like.items() if k in tree}
    return tree


def _skeleton(
    module: nn.Module, tx: optax.GradientTransformation, boxed: bool, averages: tuple[str, ...] = ()
) -> TrainState:
    """A state of the right structure; traced under eval_shape only, so it allocates nothing. Averages are laid
    out like the parameters (the same logical axes, so the same shardings)."""
    params = init_params(module, jax.random.key(0))
    params = params if boxed else nn.unbox(params)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        rng=jnp.zeros((2,), jnp.uint32),
        averages={name: params for name in averages},
    )


def state_shardings(
    module: nn.Module,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    rules: Rules,
    *,
    allow_replicated: bool = False,
    averages: tuple[str, ...] = (),
) -> Any:
    """Shardings of every leaf of the TrainState, derived from the parameters' logical axes; a large parameter
    the mesh cannot divide is a UserError (`sharding.check_replicated`) unless `allow_replicated`."""
    skeleton = jax.eval_shape(lambda: _skeleton(module, tx, boxed=True, averages=_check_averages(averages)))
    if not allow_replicated:
        check_replicated(skeleton.params, mesh, rules)
    return tree_shardings(skeleton, mesh, rules)


def create_train_state(
    module: nn.Module,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    rules: Rules,
    seed: int,
    pretrained: Any = None,
    *,
    allow_replicated: bool = False,
    averages: tuple[str, ...] = (),
) -> tuple[TrainState, Any]:
    """A fresh, sharded TrainState; parameters found in `pretrained` (numpy or jax tree) replace random ones.
    Each of `averages` (names in AVERAGES) starts as a copy of the parameters.

    Returns (state, shardings). The state is built inside `jax.jit(out_shardings=...)`, so no device ever
    holds the whole unsharded model or optimizer state. A large parameter that the mesh cannot divide is a
    UserError (`sharding.check_replicated`) unless `allow_replicated` (the config's mesh.allow_replicated).
    """
    shardings = state_shardings(module, tx, mesh, rules, allow_replicated=allow_replicated, averages=averages)
    loaded = None
    if pretrained is not None:
        loaded = put_tree(_subtree(pretrained, shardings.params), _subtree(shardings.params, pretrained))

    def init(key, loaded):
        params = nn.unbox(init_params(module, key))
        if loaded is not None:
            params = _merge(params, loaded)
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=tx.init(params),
            rng=jax.random.key_data(jax.random.fold_in(key, 1)),
            averages={name: params for name in averages},
        )

    state = jax.jit(init, out_shardings=shardings)(jax.random.key(seed), loaded)
    return state, shardings


def abstract_state(
    shardings: Any, module: nn.Module, tx: optax.GradientTransformation, averages: tuple[str, ...] = ()
) -> TrainState:
    """ShapeDtypeStructs carrying target shardings: what a checkpoint restore needs to place arrays."""
    return jax.tree_util.tree_map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
        jax.eval_shape(lambda: _skeleton(module, tx, boxed=False, averages=averages)),
        shardings,
    )
