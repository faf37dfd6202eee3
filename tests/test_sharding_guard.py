"""Sharding guard rails: the layout of every roberta-base parameter under the default rules is pinned by a golden
file, and a large parameter that the mesh cannot divide is refused unless the config accepts the copies.

The golden file holds each parameter's shape and PartitionSpec on a (data, fsdp, tensor) = (2, 2, 2) mesh, for the
MLM model and the classifier, from `jax.eval_shape` (no weights). After a deliberate layout change, regenerate it
and review the diff:

    UPDATE_GOLDEN=1 python -m pytest -q tests/test_sharding_guard.py -k golden
"""

import json
import os
from pathlib import Path

import jax
import pytest
from jax.sharding import PartitionSpec as P

from dontstop_jax.engine import DEFAULT_RULES, create_train_state, default_optim_config, make_mesh, make_optimizer
from dontstop_jax.engine.sharding import check_replicated, tree_shardings
from dontstop_jax.errors import UserError
from dontstop_jax.model import (
    ModelConfig,
    RobertaForMaskedLM,
    RobertaForSequenceClassification,
    init_params,
    tiny_config,
)

GOLDEN = Path(__file__).parent / "golden" / "partition_specs_2x2x2.json"


def _spec_json(spec) -> list:
    return [list(e) if isinstance(e, tuple) else e for e in spec]


def partition_specs() -> dict:
    """{model: {parameter path: {"shape": [...], "spec": [...]}}} for roberta-base under DEFAULT_RULES."""
    mesh = make_mesh((2, 2, 2), jax.devices()[:8])
    out = {}
    for name, module in (
        ("mlm", RobertaForMaskedLM(ModelConfig())),
        ("classification", RobertaForSequenceClassification(ModelConfig(), num_labels=2)),
    ):
        boxed = jax.eval_shape(lambda m=module: init_params(m, jax.random.key(0)))
        check_replicated(boxed, mesh, DEFAULT_RULES)  # no roberta-base weight may end up whole on every device
        shardings = tree_shardings(boxed, mesh, DEFAULT_RULES)
        shapes = jax.tree_util.tree_flatten_with_path(boxed, is_leaf=lambda x: hasattr(x, "names"))[0]
        specs = dict(jax.tree_util.tree_flatten_with_path(shardings)[0])
        out[name] = {
            "/".join(k.key for k in path): {"shape": list(leaf.value.shape), "spec": _spec_json(specs[path].spec)}
            for path, leaf in shapes
        }
    return out


def _dump(specs: dict) -> str:
    """JSON with one line per parameter, so a layout change is a one-line diff."""
    models = [
        f' "{m}": {{\n' + ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in sorted(params.items())) + "\n }"
        for m, params in sorted(specs.items())
    ]
    return "{\n" + ",\n".join(models) + "\n}\n"


def test_golden_partition_specs_of_roberta_base():
    current = partition_specs()
    if os.environ.get("UPDATE_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(_dump(current))
    golden = json.loads(GOLDEN.read_text())
    for model in ("mlm", "classification"):
        changed = {k: (golden[model].get(k), v) for k, v in current[model].items() if golden[model].get(k) != v}
        missing = sorted(set(golden[model]) - set(current[model]))
        assert not changed and not missing, (
            f"{model}: layout differs from {GOLDEN.name} (golden, now): {changed}; "
            f"gone: {missing}; see this file's docstring to regenerate"
        )
    word = current["mlm"]["roberta/embeddings/word_embeddings/embedding"]
    assert word == {"shape": [50304, 768], "spec": ["tensor", "fsdp"]}  # the padded vocabulary shards
    assert current["mlm"]["lm_head/bias"] == {"shape": [50304], "spec": ["tensor"]}


TX, _ = make_optimizer(default_optim_config(), 10)
# 5001 ids x 64 x 4 bytes = 1.2 MiB: over the limit, and odd, so tensor=2 cannot divide an unpadded table.
ODD_VOCAB = tiny_config(vocab_size=5001, hidden_size=64, intermediate_size=128)


def test_large_weight_left_whole_by_the_mesh_is_refused_unless_allowed():
    mesh = make_mesh((1, 1, 2), jax.devices()[:2])
    model = RobertaForMaskedLM(ODD_VOCAB.replace(vocab_pad_multiple=1))
    with pytest.raises(
        UserError,
        match=r"roberta/embeddings/word_embeddings/embedding \[5001, 64\] \(1\.2 MiB\) "
        r"would be replicated .* 'vocab' dimension 5001 is not divisible by tensor=2"
        r".*mesh.allow_replicated=True",
    ):
        create_train_state(model, TX, mesh, DEFAULT_RULES, seed=0)
    state, _ = create_train_state(model, TX, mesh, DEFAULT_RULES, seed=0, allow_replicated=True)
    assert state.params["roberta"]["embeddings"]["word_embeddings"]["embedding"].sharding.spec == P(None, None)
    padded, _ = create_train_state(RobertaForMaskedLM(ODD_VOCAB), TX, mesh, DEFAULT_RULES, seed=0)  # 5001 -> 5120
    assert padded.params["roberta"]["embeddings"]["word_embeddings"]["embedding"].sharding.spec == P("tensor", None)


def test_rules_that_replicate_on_purpose_and_small_weights_pass():
    """Replication the rules ask for (embed -> fsdp on a mesh with fsdp=1) is a choice, not a fallback; tiny weights
    are cheap to copy."""
    model = RobertaForMaskedLM(ODD_VOCAB.replace(vocab_pad_multiple=1))
    boxed = jax.eval_shape(lambda: init_params(model, jax.random.key(0)))
    check_replicated(boxed, make_mesh((2, 1, 1), jax.devices()[:2]), DEFAULT_RULES)
    no_vocab_rule = tuple((k, None if k == "vocab" else v) for k, v in DEFAULT_RULES)
    check_replicated(boxed, make_mesh((1, 1, 2), jax.devices()[:2]), no_vocab_rule)
    small = RobertaForMaskedLM(tiny_config(vocab_size=1001, vocab_pad_multiple=1))  # 0.24 MiB table
    check_replicated(
        jax.eval_shape(lambda: init_params(small, jax.random.key(0))),
        make_mesh((1, 1, 2), jax.devices()[:2]),
        DEFAULT_RULES,
    )


def test_phase_configs_carry_the_opt_out_and_it_is_runtime_only():
    from dontstop_jax.phases.defaults import finetune_config, pretrain_config
    from dontstop_jax.train.workdir import fingerprint

    for cfg in (pretrain_config("dapt"), finetune_config()):
        assert cfg.mesh.allow_replicated is False
        allowed = cfg.copy_and_resolve_references()
        allowed.mesh.allow_replicated = True
        assert fingerprint(allowed) == fingerprint(cfg)  # accepting copies cannot change what a phase produces
