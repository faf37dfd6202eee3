"""The training engine: mesh and shardings, optimizer, train state, jitted steps."""

from dontstop_jax.engine.optim import default_optim_config, make_optimizer, warmup_linear_decay
from dontstop_jax.engine.sharding import (
    MESH_AXES,
    batch_sharding,
    check_batch_size,
    data_parallel_size,
    make_mesh,
    to_global,
)
from dontstop_jax.engine.state import TrainState, abstract_state, create_train_state, state_shardings
from dontstop_jax.engine.steps import (
    Fixed,
    Hooks,
    StepSpec,
    chain_hooks,
    classification_loss_sums,
    compile_eval_step,
    compile_predict_step,
    compile_train_step,
    hold_fixed,
    make_eval_step,
    make_train_step,
    mlm_loss_sums,
)
from dontstop_jax.fields import DEFAULT_RULES  # the default layout rules (config field mesh.rules)
