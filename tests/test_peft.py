"""Parameter-efficient adaptation: trainable splits, identity at init, LoRA merge, adapter files, sharding,
the fine-tuning stability helpers (re-initialisation, layer-wise learning-rate decay, seed discarding) and
the grid table's extra columns."""

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from ml_collections import ConfigDict

from dontstop_jax.analysis import results_table
from dontstop_jax.engine import (
    DEFAULT_RULES,
    StepSpec,
    TrainState,
    classification_loss_sums,
    compile_train_step,
    create_train_state,
    default_optim_config,
    make_mesh,
    to_global,
)
from dontstop_jax.engine.checkpoint import Checkpointer
from dontstop_jax.engine.peft import Adaptation, configure_model, default_peft_config
from dontstop_jax.errors import UserError
from dontstop_jax.model import (
    RobertaForSequenceClassification,
    init_params,
    load_pretrained,
    save_pretrained,
    tiny_config,
)
from dontstop_jax.model.peft import load_delta, merge_lora, save_delta
from dontstop_jax.phases.finetune import reinit_top_layers
from dontstop_jax.phases.grid import Grid
from dontstop_jax.train.source import resolve

E, L, LABELS, RANK, ADAPTER = 32, 2, 3, 4, 8
CFG = tiny_config(
    vocab_size=128,
    hidden_size=E,
    num_hidden_layers=L,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=34,
)
ALL_TARGETS = ("query", "key", "value", "attention_output", "intermediate", "output")


def peft(method, **kw):
    p = default_peft_config()
    p.update(method=method, adapter_size=ADAPTER, lora_rank=RANK, top_k=1, **kw)
    return p


def batch(seed, n=8, seq=16):
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, CFG.vocab_size, (n, seq)).astype(np.int32)
    ids[:, 0], ids[:, -1] = 0, 2
    ids[1, 10:] = CFG.pad_token_id
    return {
        "input_ids": ids,
        "attention_mask": (ids != CFG.pad_token_id).astype(np.int32),
        "labels": rng.integers(0, LABELS, n).astype(np.int32),
        "example_weights": np.ones(n, np.float32),
    }


def init(cfg, seed):
    model = RobertaForSequenceClassification(cfg, LABELS)
    return jax.device_get(jax.jit(lambda key: nn.unbox(init_params(model, key)))(jax.random.key(seed)))


@functools.cache
def base_params():
    return init(CFG, 0)


@functools.cache
def _forward(cfg):
    model = RobertaForSequenceClassification(cfg, LABELS)
    return jax.jit(lambda params, ids, mask: model.apply({"params": params}, ids, mask))


def logits(cfg, params, b=None):
    b = b or batch(99)
    return np.asarray(_forward(cfg)(params, b["input_ids"], b["attention_mask"]))


def with_peft(cfg, seed=1):
    """Base parameters plus freshly initialised adapter/LoRA parameters."""
    fresh = init(cfg, seed)
    layers = {**fresh["roberta"]["layers"], **base_params()["roberta"]["layers"]}
    return {**base_params(), "roberta": {**base_params()["roberta"], "layers": layers}}


@pytest.mark.parametrize("method,extra", [("houlsby", {}), ("pfeiffer", {}), ("lora", {"lora_targets": ALL_TARGETS})])
def test_adapters_and_lora_start_as_the_identity(method, extra):
    cfg = configure_model(CFG, peft(method, **extra))
    params = with_peft(cfg)
    assert jax.tree_util.tree_structure(params) != jax.tree_util.tree_structure(base_params())  # type: ignore[operator]  # jaxlib's PyTreeDef stub
    np.testing.assert_array_equal(logits(cfg, params), logits(CFG, base_params()))


def _perturbed_lora(cfg):
    key = iter(jax.random.split(jax.random.key(5), 64))
    return jax.tree_util.tree_map_with_path(
        lambda path, x: np.asarray(x + 0.1 * jax.random.normal(next(key), x.shape)) if "_lora" in str(path) else x,
        with_peft(cfg),
    )


def test_lora_merge_gives_the_same_logits_also_after_export(tmp_path):
    cfg = configure_model(CFG, peft("lora", lora_targets=ALL_TARGETS))
    params = _perturbed_lora(cfg)
    before = logits(cfg, params)
    assert np.abs(before - logits(CFG, base_params())).max() > 1e-3  # the LoRA update really changes the model
    plain_cfg, plain = merge_lora(cfg, params)
    assert plain_cfg.lora_rank == 0 and not any("_lora" in k for k in plain["roberta"]["layers"])
    np.testing.assert_allclose(logits(plain_cfg, plain), before, rtol=1e-5, atol=1e-5)
    save_pretrained(tmp_path / "hf", plain_cfg, plain, "classification")
    cfg2, loaded, head = load_pretrained(tmp_path / "hf")
    assert head == "classification"
    np.testing.assert_allclose(logits(cfg2, loaded), before, rtol=1e-5, atol=1e-5)


def _expected_count(method):
    head = E * E + E + E * LABELS + LABELS
    layer_norms = 4 * E * L
    if method == "frozen":
        return head
    if method == "bitfit":  # q,k,v,attn-out, intermediate, output biases; 3 LayerNorm biases
        return head + L * (4 * E + CFG.intermediate_size + E) + E + L * 2 * E
    if method == "houlsby":
        return head + layer_norms + L * 2 * (E * ADAPTER + ADAPTER + ADAPTER * E + E)
    if method == "pfeiffer":
        return head + layer_norms + L * (E * ADAPTER + ADAPTER + ADAPTER * E + E)
    if method == "lora":  # query and value: A [E, r] and B [r, E] each
        return head + L * 2 * (E * RANK + RANK * E)
    return None


def train(method, mesh_shape=(1, 1, 1), devices=None, steps=3, lr_decay=1.0):
    p = peft(method)
    cfg = configure_model(CFG, p)
    adaptation = Adaptation.from_config(p, cfg, lr_decay=lr_decay)
    optim = default_optim_config()
    # Step 0 has learning rate 0 (warm-up); zero-initialised adapter up-projections and LoRA B move at step 1,
    # which gives their partners a gradient from step 2 on. Weight decay 0.1 would move frozen slices.
    optim.update(learning_rate=1e-2, weight_decay=0.1, warmup_fraction=0.0)
    tx, _ = adaptation.optimizer(optim, 10)
    mesh = make_mesh(mesh_shape, devices or jax.devices()[:1])
    model = RobertaForSequenceClassification(cfg, LABELS)
    state, shardings = create_train_state(model, tx, mesh, DEFAULT_RULES, seed=0, pretrained=base_params())
    start = jax.device_get(state.params)
    spec = StepSpec(classification_loss_sums(model), tx, hooks=adaptation.hooks())
    step = compile_train_step(spec, shardings, mesh, DEFAULT_RULES)
    for i in range(steps):
        state, _ = step(state, to_global(batch(i), mesh))
    return adaptation, start, state


def _leaves(tree):
    return {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.mark.parametrize("method", ["frozen", "bitfit", "houlsby", "pfeiffer", "lora", "top_k"])
def test_only_trainable_parameters_move_and_frozen_ones_have_no_adam_state(method):
    adaptation, start, state = train(method)
    end = jax.device_get(state.params)
    trainable, total = adaptation.count(end)
    if method != "top_k":
        assert trainable == _expected_count(method)
    assert trainable < total
    flags = _leaves(adaptation.trainable(end))
    moments = _leaves(state.opt_state.inner_states["train"].inner_state[1][0].mu)
    for name, before in _leaves(start).items():
        after = _leaves(end)[name]
        if "['layers']" in name and method == "top_k":  # bottom layer frozen slice by slice, top layer trains
            np.testing.assert_array_equal(after[0], before[0])
            assert not np.array_equal(after[1], before[1]), name
        elif flags[name]:
            assert not np.array_equal(after, before), name
            assert name in moments
        else:
            np.testing.assert_array_equal(after, before)  # bit for bit, weight decay included
            assert name not in moments  # no Adam state for frozen leaves
    if method == "top_k":
        per_layer = sum(v.size for k, v in _leaves(end).items() if "['layers']" in k) // L
        head = sum(v.size for k, v in _leaves(end).items() if "classifier" in k)
        assert trainable == per_layer + head


def test_adapter_training_on_an_8_device_mesh_equals_one_device_per_batch_shard():
    """Dropout is drawn per batch shard (make_train_step): the reference splits the batch 4 ways as (2,2,2) does."""
    _, _, one = train("houlsby", (4, 1, 1), jax.devices()[:4], steps=3)
    _, _, eight = train("houlsby", (2, 2, 2), jax.devices(), steps=3)
    down = eight.params["roberta"]["layers"]["output_adapter"]["down"]["kernel"]  # [L, embed, adapter]
    assert down.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", None)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
        jax.device_get(eight.params),
        jax.device_get(one.params),
    )
    adapters_moved = eight.params["roberta"]["layers"]["output_adapter"]["up"]["kernel"]
    assert np.abs(np.asarray(adapters_moved)).max() > 0  # zero-initialised up-projection has trained


def test_adapter_file_holds_only_what_was_trained_and_loads_onto_the_base(tmp_path):
    adaptation, _, state = train("lora")
    params = jax.device_get(state.params)
    cfg = configure_model(CFG, peft("lora"))
    path = save_delta(tmp_path / "peft.safetensors", params, adaptation.trainable(params), cfg)
    full_bytes = sum(v.nbytes for v in jax.tree_util.tree_leaves(params))
    assert path.stat().st_size < full_bytes / 3
    cfg2, loaded = load_delta(path, base_params())
    assert cfg2 == cfg
    jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, params)
    np.testing.assert_array_equal(logits(cfg2, loaded), logits(cfg, params))
    with pytest.raises(UserError, match="not a file"):
        load_delta(tmp_path / "missing.safetensors", base_params())


def test_layerwise_lr_decay_scales_updates_per_layer():
    adaptation = Adaptation.from_config(peft("full"), CFG, lr_decay=0.5)
    ones = jax.tree_util.tree_map(np.ones_like, base_params())
    update = adaptation.update_transform()
    assert update is not None
    scaled = update(ones)
    np.testing.assert_allclose(scaled["roberta"]["layers"]["query"]["kernel"][:, 0, 0, 0], [0.5, 1.0])  # top = 1
    assert float(scaled["roberta"]["embeddings"]["LayerNorm"]["scale"][0]) == 0.25
    assert float(scaled["classifier"]["dense"]["kernel"][0, 0]) == 1.0
    # Through AdamW: step 0 has learning rate 0, so after 2 steps each run has made one update from the same
    # parameters, and the decayed run's update is the plain one times the layer's factor.
    moves = []
    for decay in (1.0, 0.5):
        _, start, state = train("full", steps=2, lr_decay=decay)
        moves.append(jax.tree_util.tree_map(np.subtract, jax.device_get(state.params), start))
    plain, decayed = moves
    bias = "roberta", "layers", "output", "bias"
    get = lambda tree, path: functools.reduce(lambda t, k: t[k], path, tree)
    assert np.abs(get(plain, bias)).min() > 0
    np.testing.assert_allclose(get(decayed, bias), get(plain, bias) * np.array([[0.5], [1.0]]), rtol=1e-4)
    word = "roberta", "embeddings", "word_embeddings", "embedding"  # atol: float32 rounding of p1 - p0
    np.testing.assert_allclose(get(decayed, word), get(plain, word) * 0.25, rtol=1e-4, atol=1e-8)
    with pytest.raises(UserError, match="decay"):
        Adaptation.from_config(peft("full"), CFG, lr_decay=1.5)


def test_reinit_top_layers_redraws_only_the_top_slices():
    mesh = make_mesh((1, 1, 1), jax.devices()[:1])
    model = RobertaForSequenceClassification(CFG, LABELS)
    tx = optax.sgd(0.1)
    state, shardings = create_train_state(model, tx, mesh, DEFAULT_RULES, seed=0, pretrained=base_params())
    trained = jax.tree_util.tree_map(lambda x: x + 1.0, state.params)  # every slice differs from any init
    out = jax.device_get(reinit_top_layers(model, trained, 1, seed=3, shardings=shardings.params))
    trained = jax.device_get(trained)
    layers, old = out["roberta"]["layers"], trained["roberta"]["layers"]
    np.testing.assert_array_equal(layers["query"]["kernel"][0], old["query"]["kernel"][0])
    np.testing.assert_array_equal(layers["output_LayerNorm"]["scale"][1], np.ones(E))  # the initializer's value
    assert np.std(layers["query"]["kernel"][1]) == pytest.approx(CFG.initializer_range, rel=0.2)
    np.testing.assert_array_equal(out["classifier"]["dense"]["kernel"], trained["classifier"]["dense"]["kernel"])
    with pytest.raises(UserError, match="reinit_top_layers"):
        reinit_top_layers(model, trained, 3, seed=3, shardings=shardings.params)


def test_bad_peft_settings_are_one_line_errors():
    with pytest.raises(UserError, match="peft.method"):
        configure_model(CFG, peft("prefix"))
    with pytest.raises(UserError, match="lora_targets"):
        configure_model(CFG, peft("lora", lora_targets=("query", "ffn")))
    with pytest.raises(UserError, match="top_k"):
        Adaptation.from_config(
            peft(
                "top_k",
            ),
            CFG.replace(num_hidden_layers=0),
        )
    with pytest.raises(UserError, match="second kind"):
        configure_model(configure_model(CFG, peft("houlsby")), peft("pfeiffer"))


def test_mean_pooling_reads_real_tokens_only():
    cfg = configure_model(CFG, peft("frozen", pooling="mean"))
    b = batch(3)
    padded = {k: v.copy() for k, v in b.items()}
    row = 1  # has padding from position 10: changing padded ids must not change its logits
    padded["input_ids"][row, 12:15] = 7
    np.testing.assert_allclose(logits(cfg, base_params(), padded)[row], logits(cfg, base_params(), b)[row], rtol=1e-5)
    assert not np.allclose(logits(cfg, base_params(), b), logits(CFG, base_params(), b))
    assert math.isfinite(float(logits(cfg, base_params(), b).sum()))


def test_seed_discard_bar_is_the_keep_th_best_early_score_of_earlier_seeds():
    cfg = ConfigDict(
        dict(
            workdir="unused",
            variants=[],
            tasks={},
            domains={},
            methods=["full", "lora"],
            seed_discard=dict(fraction=0.3, keep=2),
            finetune=dict(peft=default_peft_config()),
        )
    )
    grid = Grid(cfg)
    assert grid.methods() == ["full", "lora"]
    assert grid.discard([0.7]) == {"train.discard_fraction": 0.3, "train.discard_below": None}  # first `keep` run
    assert grid.discard([0.7, 0.9, 0.8])["train.discard_below"] == 0.8
    cfg.seed_discard.fraction = 0.0
    assert grid.discard([0.7, 0.9]) == {}
    cfg.methods = ["full", "prefix"]
    with pytest.raises(UserError, match="peft.method"):
        grid.methods()


def test_method_overrides_set_fine_tuning_fields_per_method_and_reject_typos():
    from dontstop_jax.config_loader import override
    from dontstop_jax.phases.defaults import finetune_config

    cfg = ConfigDict(
        dict(
            workdir="unused",
            variants=[],
            tasks={},
            domains={},
            methods=["full", "lora"],
            method_overrides={},
            finetune=finetune_config(),
        )
    )
    override(cfg, "method_overrides", "{'lora': {'optim': {'learning_rate': 1e-2}, 'train': {'epochs': 20}}}")
    grid = Grid(cfg)
    assert grid.method_overrides("lora") == {"optim.learning_rate": 1e-2, "train.epochs": 20}
    assert grid.method_overrides("full") == {}
    cfg.method_overrides = {"lora": {"optim": {"learning_rat": 1e-2}}}
    with pytest.raises(UserError, match="'optim.learning_rat', which is not a fine-tuning config field"):
        grid.method_overrides("lora")
    cfg.method_overrides = {"bitfit": {"train": {"epochs": 5}}}
    with pytest.raises(UserError, match=r"names \['bitfit'\], which are not in methods"):
        grid.method_overrides("full")


def test_named_setups_are_methods_that_their_overrides_define():
    from dontstop_jax.phases.defaults import finetune_config

    cfg = ConfigDict(
        dict(
            workdir="unused",
            variants=[],
            tasks={},
            domains={},
            methods=["full", "r3f", "lora_smart"],
            method_overrides={
                "r3f": {"regularizer": {"method": "r3f"}},
                "lora_smart": {"peft": {"method": "lora"}, "regularizer": {"method": "smart"}},
            },
            finetune=finetune_config(),
        )
    )
    grid = Grid(cfg)
    assert grid.methods() == ["full", "r3f", "lora_smart"]
    assert [grid.peft_method(m) for m in grid.methods()] == ["full", "full", "lora"]
    assert grid.method_overrides("r3f") == {"regularizer.method": "r3f"}
    cfg.methods = ["full", "r3ff"]  # a typo that no override defines
    with pytest.raises(UserError, match="peft.method='r3ff' is unknown"):
        grid.methods()
    cfg.methods = ["r3f", "r3f"]
    with pytest.raises(UserError, match="lists a name twice"):
        grid.methods()


def test_table_shows_parameter_counts_epoch_times_and_discarded_seeds():
    records = [
        {
            "task": "t",
            "variant": v,
            "seed": s,
            "metrics": {"f1": m},
            "discarded": d,
            "extras": {"trainable_params": n, "seconds_per_epoch": 2.0 + s},
        }
        for v, n in (("baseline", 125_000_000), ("baseline/lora", 300_000))
        for s, m, d in ((0, 0.8, False), (1, 0.7, False), (2, 0.1, v == "baseline/lora"))
    ]
    table = results_table(records, {"t": "f1"}, variant_order=["baseline", "baseline/lora"])
    markdown = table.to_markdown()
    assert "125M params, 3 s/epoch" in markdown and "n=2 (+1 discarded), 300K params" in markdown
    lora = table.cells[("baseline/lora", "t")]
    assert lora.values == (0.8, 0.7) and lora.discarded == 1  # the discarded seed is not averaged in
    assert "discarded" in table._csv_text().splitlines()[0]


def test_a_phase_started_from_a_lora_phase_starts_from_the_merged_weights(tmp_path, small_tokenizer_dir):
    cfg = configure_model(CFG, peft("lora"))
    params = _perturbed_lora(cfg)
    source = resolve(_phase_dir(tmp_path, cfg, params, small_tokenizer_dir))
    assert source.config.lora_rank == 0 and "query_lora" not in source.params["roberta"]["layers"]
    np.testing.assert_allclose(logits(source.config, source.params), logits(cfg, params), rtol=1e-5, atol=1e-5)


def _phase_dir(root, cfg, params, tokenizer):
    """A finished phase's workdir holding `params` (what `init` reads), without running one."""
    state = TrainState(
        step=jnp.array(1, jnp.int32), params=params, opt_state=np.zeros(1, np.float32), rng=jnp.zeros(2, jnp.uint32)
    )
    ckpt = Checkpointer(root / "checkpoints", async_save=False)
    ckpt.save(state, data_state={}, meta={"model_config": dataclasses.asdict(cfg), "tokenizer_dir": tokenizer})
    ckpt.close()
    (root / "DONE.json").write_text("{}")  # the completion marker: only a finished phase can be an init
    return str(root)


@pytest.mark.parametrize("method", ["houlsby", "lora"])
def test_init_delta_puts_an_adapter_file_onto_its_base_model(tmp_path, method, small_tokenizer_dir):
    """`init=<base> init_delta=<peft.safetensors>`: the phase starts from the trained parameter-efficient model
    (LoRA folded in, as from a parent phase), from the base model and the small file alone."""
    base = _phase_dir(tmp_path / "base", CFG, base_params(), small_tokenizer_dir)
    adaptation, _, state = train(method)
    trained = jax.device_get(state.params)
    cfg = configure_model(CFG, peft(method))
    delta = str(save_delta(tmp_path / "peft.safetensors", trained, adaptation.trainable(trained), cfg))
    source = resolve(base, delta=delta)
    assert source.parent.endswith(f"+delta:{delta}")
    assert source.config.adapter == ("houlsby" if method == "houlsby" else "none") and source.config.lora_rank == 0
    np.testing.assert_allclose(logits(source.config, source.params), logits(cfg, trained), rtol=1e-5, atol=1e-5)
    assert np.abs(logits(cfg, trained) - logits(CFG, base_params())).max() > 1e-4  # the file changed the model

    other = CFG.replace(max_position_embeddings=CFG.max_position_embeddings + 8)
    with pytest.raises(UserError, match="another architecture .max_position_embeddings"):
        resolve(_phase_dir(tmp_path / "other", other, init(other, 0), small_tokenizer_dir), delta=delta)
    with pytest.raises(UserError, match="init=scratch has none"):
        resolve("scratch", tokenizer="tok", model=ConfigDict(dataclasses.asdict(CFG)), delta=delta)


def test_task_overrides_set_tapt_and_fine_tuning_fields_per_task_and_reject_typos():
    from dontstop_jax.config_loader import load

    cfg = load(
        "configs/grid.py:paper",
        [
            "--config.tasks.rct.overrides={'tapt': {'train': {'epochs': 20}}, "
            "'finetune': {'train': {'steps_per_epoch': 2000, 'epochs': 3}}}"
        ],
    )
    grid = Grid(cfg)
    assert grid.task_overrides("rct", "tapt") == {"train": {"epochs": 20}}
    assert grid.task_overrides("rct", "finetune") == {"train": {"steps_per_epoch": 2000, "epochs": 3}}
    assert grid.task_overrides("chemprot", "finetune") == {}
    for override, message in [
        ("{'tapt': {'train': {'epoch': 20}}}", "tasks.rct.overrides.tapt.train has no field 'epoch'"),
        (
            "{'dapt': {'train': {'steps': 5}}}",
            "tasks.rct.overrides.dapt: a task overrides only its tapt and finetune phases",
        ),
        (
            "{'finetune': {'train': {'steps_per_epoch': 0}}}",
            "tasks.rct.overrides.finetune.train.steps_per_epoch=0 must be > 0",
        ),
    ]:
        with pytest.raises(UserError, match=message.replace(".", r"\.")):
            load("configs/grid.py:paper", [f"--config.tasks.rct.overrides={override}"])
    with pytest.raises(UserError, match=r"tasks\.t has unknown field\(s\) epoch"):
        load(
            "configs/grid.py:paper",
            [
                "--config.tasks={'t': {'path': 'x', 'domain': 'cs', 'metric': 'macro_f1', "
                "'epoch': 3, 'text_field': 'text', 'label_field': 'label'}}"
            ],
        )
