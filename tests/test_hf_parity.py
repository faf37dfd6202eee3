"""Our Flax RoBERTa is numerically transformers' PyTorch RoBERTa; import/export round-trips exactly."""

import dataclasses
import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dontstop_jax.errors import UserError
from dontstop_jax.model import (
    RobertaForMaskedLM,
    RobertaForSequenceClassification,
    RobertaModel,
    load_pretrained,
    save_pretrained,
)
from dontstop_jax.model.roberta import PAD_LOGIT

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

HF_CONFIG: dict[str, Any] = dict(
    vocab_size=97,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=42,
    type_vocab_size=1,
    layer_norm_eps=1e-5,
    pad_token_id=1,
)


def _random_hf_model(cls, tmp_path, name, **extra):
    torch.manual_seed(0)
    model = cls(transformers.RobertaConfig(**HF_CONFIG, **extra)).eval()
    with torch.no_grad():  # randomise everything, biases and LayerNorms included, so no term can hide
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    model.save_pretrained(tmp_path / name)
    return model, tmp_path / name


def _padded_batch():
    rng = np.random.default_rng(0)
    ids = rng.integers(5, HF_CONFIG["vocab_size"], size=(3, 17))
    ids[:, 0] = 0
    lengths = [17, 11, 4]
    for row, n in enumerate(lengths):
        ids[row, n - 1] = 2
        ids[row, n:] = 1
    return ids, (ids != 1).astype(np.int64)


def _torch_out(model, ids, mask):
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    return (out.logits if hasattr(out, "logits") else out.last_hidden_state).numpy()


def _ours(module, params, ids, mask):
    """Our outputs; MLM logits cut to the real vocabulary (our table has padded_vocab_size rows)."""
    out = np.asarray(module.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask)))
    return out[..., : HF_CONFIG["vocab_size"]] if isinstance(module, RobertaForMaskedLM) else out


def test_mlm_logits_match_transformers(tmp_path):
    """97 real ids in a 128-row table: the real vocabulary's logits are transformers', the padding ids' are
    PAD_LOGIT (probability exactly 0), and the imported padding rows are zeros."""
    hf, path = _random_hf_model(transformers.RobertaForMaskedLM, tmp_path, "mlm")
    cfg, params, head = load_pretrained(path)
    assert head == "mlm" and (cfg.vocab_size, cfg.padded_vocab_size) == (97, 128)
    assert params["roberta"]["embeddings"]["word_embeddings"]["embedding"].shape == (128, 32)
    assert not params["roberta"]["embeddings"]["word_embeddings"]["embedding"][97:].any()
    assert not params["lm_head"]["bias"][97:].any()
    ids, mask = _padded_batch()
    full = np.asarray(RobertaForMaskedLM(cfg).apply({"params": params}, ids, mask))
    assert full.shape[-1] == 128 and np.all(full[..., 97:] == PAD_LOGIT)
    assert np.all(np.asarray(jax.nn.softmax(full, axis=-1))[..., 97:] == 0.0)
    ours, theirs = full[..., :97], _torch_out(hf, ids, mask)
    real = mask.astype(bool)
    assert np.abs(ours - theirs)[real].max() <= 1e-4


def test_unpadded_model_gives_the_same_logits(tmp_path):
    """vocab_pad_multiple=1 keeps the table at the real size; both layouts compute the same model."""
    _, path = _random_hf_model(transformers.RobertaForMaskedLM, tmp_path, "mlm")
    ids, mask = _padded_batch()
    padded_cfg, padded, _ = load_pretrained(path)
    plain_cfg, plain, _ = load_pretrained(path, vocab_pad_multiple=1)
    assert plain["lm_head"]["bias"].shape == (97,)
    np.testing.assert_allclose(
        _ours(RobertaForMaskedLM(padded_cfg), padded, ids, mask),
        _ours(RobertaForMaskedLM(plain_cfg), plain, ids, mask),
        atol=1e-6,
    )


def test_classification_logits_match_transformers(tmp_path):
    hf, path = _random_hf_model(transformers.RobertaForSequenceClassification, tmp_path, "cls", num_labels=3)
    cfg, params, head = load_pretrained(path)
    assert head == "classification"
    ids, mask = _padded_batch()
    ours = _ours(RobertaForSequenceClassification(cfg, 3), params, ids, mask)
    assert np.abs(ours - _torch_out(hf, ids, mask)).max() <= 1e-4


def test_encoder_checkpoint_imports(tmp_path):
    hf, path = _random_hf_model(transformers.RobertaModel, tmp_path, "enc")
    cfg, params, head = load_pretrained(path)
    assert head == "encoder" and set(params) == {"roberta"}
    ids, mask = _padded_batch()
    ours = np.asarray(RobertaModel(cfg).apply({"params": params["roberta"]}, jnp.asarray(ids), jnp.asarray(mask)))
    real = mask.astype(bool)
    assert np.abs(ours - _torch_out(hf, ids, mask))[real].max() <= 1e-4


def test_masked_positions_equal_full_logits_there(tmp_path):
    _, path = _random_hf_model(transformers.RobertaForMaskedLM, tmp_path, "mlm")
    cfg, params, _ = load_pretrained(path)
    ids, mask = _padded_batch()
    positions = np.array([[1, 5, 9], [2, 3, 0], [1, 2, 0]])
    model = RobertaForMaskedLM(cfg)
    full = _ours(model, params, ids, mask)
    gathered = np.asarray(model.apply({"params": params}, ids, mask, jnp.asarray(positions)))[..., :97]
    np.testing.assert_allclose(gathered, np.take_along_axis(full, positions[..., None], axis=1), atol=1e-5)


@pytest.mark.parametrize(
    "head,cls,extra",
    [
        ("mlm", "AutoModelForMaskedLM", {}),
        ("classification", "AutoModelForSequenceClassification", {"num_labels": 3}),
    ],
)
def test_export_reloads_in_transformers_and_round_trips(tmp_path, head, cls, extra):
    hf_cls = transformers.RobertaForMaskedLM if head == "mlm" else transformers.RobertaForSequenceClassification
    hf, path = _random_hf_model(hf_cls, tmp_path, "src", **extra)
    cfg, params, _ = load_pretrained(path)
    labels = ["neg", "neu", "pos"] if head == "classification" else None
    out = save_pretrained(tmp_path / "export", cfg, params, head, label_names=labels)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 97  # the padding rows stay ours
    from safetensors.numpy import load_file

    exported = load_file(str(out / "model.safetensors"))
    assert exported["roberta.embeddings.word_embeddings.weight"].shape == (97, 32)
    reloaded = getattr(transformers, cls).from_pretrained(out).eval()
    ids, mask = _padded_batch()
    np.testing.assert_allclose(_torch_out(reloaded, ids, mask), _torch_out(hf, ids, mask), atol=1e-5)
    if labels:
        assert json.loads((out / "config.json").read_text())["id2label"]["2"] == "pos"
    _, again, _ = load_pretrained(out)  # import -> export -> import is bit-identical
    flat_a, flat_b = _flatten(params), _flatten(again)
    assert flat_a.keys() == flat_b.keys()
    for key in flat_a:
        np.testing.assert_array_equal(flat_a[key], flat_b[key], err_msg=key)


def _flatten(tree, prefix=""):
    out: dict[str, Any] = {}
    for k, v in tree.items():
        out.update(_flatten(v, f"{prefix}{k}/") if isinstance(v, dict) else {prefix + k: np.asarray(v)})
    return out


def test_pytorch_bin_checkpoint_loads(tmp_path):
    hf, path = _random_hf_model(transformers.RobertaForMaskedLM, tmp_path, "bin")
    torch.save(hf.state_dict(), path / "pytorch_model.bin")
    (path / "model.safetensors").unlink()
    cfg, params, _ = load_pretrained(path)
    ids, mask = _padded_batch()
    real = mask.astype(bool)
    assert np.abs(_ours(RobertaForMaskedLM(cfg), params, ids, mask) - _torch_out(hf, ids, mask))[real].max() <= 1e-4


def test_partial_checkpoint_names_the_missing_tensor(tmp_path):
    _, path = _random_hf_model(transformers.RobertaForMaskedLM, tmp_path, "partial")
    config = json.loads((path / "config.json").read_text())
    config["num_hidden_layers"] = 3  # config promises a layer the weights do not have
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=r"roberta\.encoder\.layer\.2\.attention\.self\.query\.weight"):
        load_pretrained(path)


def test_shape_mismatch_names_the_tensor(tmp_path):
    _, path = _random_hf_model(transformers.RobertaForMaskedLM, tmp_path, "shape")
    config = json.loads((path / "config.json").read_text())
    config["intermediate_size"] = 48
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=r"intermediate\.dense\.weight.*shape"):
        load_pretrained(path)


def test_missing_directory_is_one_clear_line(tmp_path):
    with pytest.raises(UserError, match="no config.json"):
        load_pretrained(tmp_path / "nowhere")


def test_export_refuses_to_clobber(tmp_path):
    _, path = _random_hf_model(transformers.RobertaForMaskedLM, tmp_path, "src")
    cfg, params, _ = load_pretrained(path)
    with pytest.raises(UserError, match="already exists"):
        save_pretrained(path, cfg, params, "mlm")
    assert (path / "model.safetensors").exists()  # nothing already written is lost


def test_tokenizer_larger_than_the_embedding_table_is_refused(tmp_path, tiny_tokenizer_dir):
    from dontstop_jax.model import check_tokenizer, read_config

    _, path = _random_hf_model(transformers.RobertaForMaskedLM, tmp_path, "small-vocab")  # 97 rows
    with pytest.raises(UserError, match=r"tokens but the model's vocab_size is 97"):
        check_tokenizer(read_config(path), tiny_tokenizer_dir)
    with pytest.raises(UserError, match="no tokenizer files"):
        check_tokenizer(read_config(path), path)
    size = len(transformers.AutoTokenizer.from_pretrained(tiny_tokenizer_dir))  # read from tokenizer.json alike
    check_tokenizer(dataclasses.replace(read_config(path), vocab_size=size), tiny_tokenizer_dir)
    with pytest.raises(UserError, match=f"has {size} tokens"):
        check_tokenizer(dataclasses.replace(read_config(path), vocab_size=size - 1), tiny_tokenizer_dir)


def test_cudnn_attention_path_gives_the_same_logits(tmp_path, monkeypatch):
    """attention_impl=cudnn hands padding to cuDNN as key lengths (it refuses a broadcast mask). Without a GPU the
    call is routed to XLA's implementation of the same arguments: the model must still be transformers'."""
    real = jax.nn.dot_product_attention
    calls = []

    def on_cpu(*args, implementation=None, **kwargs):
        calls.append((implementation, kwargs.get("mask"), kwargs.get("key_value_seq_lengths")))
        return real(*args, implementation="xla" if implementation == "cudnn" else implementation, **kwargs)

    monkeypatch.setattr(jax.nn, "dot_product_attention", on_cpu)
    hf, path = _random_hf_model(transformers.RobertaForSequenceClassification, tmp_path, "cls", num_labels=3)
    cfg, params, _ = load_pretrained(path, attention_impl="cudnn", dtype="bfloat16")
    ids, mask = _padded_batch()
    ours = _ours(
        RobertaForSequenceClassification(cfg.replace(dtype="float32", attention_impl=None), 3), params, ids, mask
    )
    calls.clear()
    object.__setattr__(cfg, "dtype", "float32")  # bypass the cudnn/float32 check: XLA runs float32 on CPU
    fused = _ours(RobertaForSequenceClassification(cfg, 3), params, ids, mask)
    assert calls and all(impl == "cudnn" and m is None for impl, m, _ in calls)
    np.testing.assert_array_equal(np.asarray(calls[0][2]), [17, 11, 4])
    np.testing.assert_allclose(fused, ours, atol=1e-5)
    assert np.abs(fused - _torch_out(hf, ids, mask)).max() <= 1e-4


def test_cudnn_attention_needs_half_precision():
    from dontstop_jax.model import ModelConfig

    with pytest.raises(UserError, match="cudnn has no float32 kernel"):
        ModelConfig(attention_impl="cudnn")
    with pytest.raises(UserError, match="attention_impl='flash' is unknown"):
        ModelConfig(attention_impl="flash", dtype="bfloat16")


def test_fused_attention_in_training_is_the_explicit_attention_and_keeps_documents_apart():
    """With attention dropout 0 training takes the fused path (jax.nn.dot_product_attention, XLA here): the same
    outputs and gradients as RoBERTa's explicit attention, and packed documents (segment ids in the mask) stay
    apart: changing one document's tokens changes no other document's outputs."""
    from dontstop_jax.model.roberta import attention_pairs, explicit_attention

    q, k, v = (jax.random.normal(jax.random.PRNGKey(i), (2, 12, 2, 8)) for i in range(3))
    segments = jnp.asarray([[1] * 5 + [2] * 4 + [0] * 3, [1] * 12])  # row 0: two documents and padding
    pairs = attention_pairs(segments)

    def loss(fn, q, k, v):
        return jnp.sum(jnp.sin(fn(q, k, v, pairs)[:, :9]))  # real tokens only

    fused = lambda q, k, v, m: jax.nn.dot_product_attention(q, k, v, mask=m, implementation="xla")
    np.testing.assert_allclose(fused(q, k, v, pairs), explicit_attention(q, k, v, pairs), atol=1e-5)
    for a, b in zip(
        jax.grad(loss, argnums=(1, 2, 3))(fused, q, k, v),
        jax.grad(loss, argnums=(1, 2, 3))(explicit_attention, q, k, v),
    ):
        np.testing.assert_allclose(a, b, atol=1e-5)
    other = v.at[0, 5:9].set(7.0)  # the second document's values
    assert np.allclose(fused(q, k, other, pairs)[0, :5], fused(q, k, v, pairs)[0, :5], atol=1e-6)
    assert not np.allclose(fused(q, k, other, pairs)[0, 5:9], fused(q, k, v, pairs)[0, 5:9])


def test_splash_kernel_keeps_documents_apart_and_is_the_explicit_attention():
    """The TPU splash kernel (run by Pallas' interpreter here) with per-document segment ids: outputs and
    gradients of the real tokens equal the explicit attention under `attention_pairs`' mask."""
    from dontstop_jax.model.roberta import attention_pairs, explicit_attention, splash_attention

    q, k, v = (jax.random.normal(jax.random.PRNGKey(i), (2, 128, 1, 32)) for i in range(3))
    segments = jnp.asarray([[1] * 50 + [2] * 40 + [0] * 38, [1] * 128])
    real = segments[..., None, None] > 0

    def run(attention):
        out, vjp = jax.vjp(attention, q, k, v)
        return (out * real, *vjp(jnp.cos(out) * real))

    splash = run(lambda q, k, v: splash_attention(q, k, v, segments, interpret=True))
    explicit = run(lambda q, k, v: explicit_attention(q, k, v, attention_pairs(segments)))
    for a, b in zip(splash, explicit):
        np.testing.assert_allclose(a, b, atol=1e-5)
