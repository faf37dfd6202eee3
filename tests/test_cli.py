"""Config files and command-line overrides: typos are errors, values keep their types (more: test_config.py)."""

import copy
import functools
import json
import subprocess
import sys

import pytest

from dontstop_jax import config_loader
from dontstop_jax.errors import UserError
from dontstop_jax.phases.defaults import finetune_config, pretrain_config
from dontstop_jax.train.workdir import fingerprint


def test_config_args_pick_the_paper_settings():
    assert config_loader.load("configs/finetune.py:chemprot").train.metric == "micro_f1"
    assert config_loader.load("configs/finetune.py:imdb").train.metric == "macro_f1"


def test_overrides_parse_to_the_fields_types():
    cfg = config_loader.load("configs/dapt.py:biomed")
    config_loader.apply_overrides(
        cfg,
        [
            "--config.train.steps=100",
            "--config.optim.learning_rate=1",
            "--config.init",
            "/models/roberta-base",
            "--config.mesh.shape=[2, -1, 1]",
            '--config.data.sources=["a.txt", "b/*.jsonl"]',
        ],
    )
    assert cfg.train.steps == 100 and cfg.optim.learning_rate == 1.0 and isinstance(cfg.optim.learning_rate, float)
    assert cfg.init == "/models/roberta-base" and cfg.mesh.shape == (2, -1, 1)
    assert list(cfg.data.sources) == ["a.txt", "b/*.jsonl"]


def test_a_typo_is_an_error_naming_the_known_fields():
    cfg = config_loader.load("configs/dapt.py:biomed")
    with pytest.raises(UserError, match="train has no field 'stpes'; known fields: .*steps"):
        config_loader.apply_overrides(cfg, ["--config.train.stpes=5"])
    with pytest.raises(UserError, match="no field 'nope'"):
        config_loader.apply_overrides(cfg, ["--config.nope=1"])
    with pytest.raises(UserError, match="does not exist"):
        config_loader.load("configs/missing.py:x")


def test_fingerprint_ignores_names_and_places_but_not_settings():
    a = config_loader.load("configs/dapt.py:biomed")
    b = config_loader.load("configs/dapt.py:cs")
    assert fingerprint(a) == fingerprint(b)  # only name/workdir differ
    b.train.steps = 7
    assert fingerprint(a) != fingerprint(b)


# Fields and sections added after phases were recorded (declared in fields.py as Neutral at their old value, or
# counted only When their switch is on): at their defaults a phase fingerprints as one recorded before they existed.
ADDED_LATER = [
    "task.train_size",
    "train.prune_top_layers",
    "regularizer",
    "averaging",
    "data.attend_across_documents",
    "data.span_masking",
    "das.general",
    "das.contrast",
    "das.random",
    "ewc",
    "derpp",
    "hat",
    "task.shots",
    "head",
    "prompt",
    "train.fresh_head",
    "multitask",
    "unit_gates",
]


@pytest.mark.parametrize("kind", ["dapt", "finetune"])
def test_fields_added_later_keep_the_fingerprints_of_phases_recorded_before_them(kind):
    cfg = finetune_config() if kind == "finetune" else pretrain_config(kind)
    recorded = json.loads(cfg.to_json_best_effort())
    for dotted in ADDED_LATER:
        *parents, leaf = dotted.split(".")
        functools.reduce(lambda tree, key: tree.get(key, {}), parents, recorded).pop(leaf, None)
    assert fingerprint(cfg) == fingerprint(recorded)
    changed = (
        [
            ("regularizer.method", "r3f"),
            ("averaging.method", "ema"),
            ("train.prune_top_layers", 1),
            ("head", "prompt"),
            ("task.shots", 16),
            ("train.fresh_head", True),
            ("multitask.method", "mlm"),
        ]
        if kind == "finetune"
        else [("objective", "ewc"), ("data.attend_across_documents", False), ("das.random", True)]
    )
    for field, value in changed:
        other = config_loader.set_fields(copy.deepcopy(cfg), {field: value})
        assert fingerprint(other) != fingerprint(recorded), field


# The fingerprints of the shipped grids' phase templates as loaded on a CPU, recorded before fields.py declared
# the fields: a field added since must count so that these stay (runtime only, left out at its old value, or
# counted only while a switch is on), or every finished phase of these grids would train again.
PINNED = {
    "synthetic.py:tiny": {
        "base_pretrain": "5ff4bf3dbf",
        "dapt": "ef65cb28d9",
        "tapt": "0330d73070",
        "finetune": "a98add2e40",
        "select": "daaa913e27",
    },
    "synthetic.py:default": {
        "base_pretrain": "ced35b9b76",
        "dapt": "6c89d12a5d",
        "tapt": "cacc108e4e",
        "finetune": "ce41f093d4",
        "select": "daaa913e27",
    },
    "grid.py:paper": {"dapt": "7fbe02c00c", "tapt": "5638971e74", "finetune": "e4b0c1ae71", "select": "693e47d5f3"},
}


@pytest.mark.parametrize("spec", sorted(PINNED))
def test_the_shipped_phases_keep_the_fingerprints_recorded_before_the_fields_were_declared(spec):
    cfg = config_loader.load(f"configs/{spec}")
    assert {slot: fingerprint(cfg[slot]) for slot in PINNED[spec]} == PINNED[spec]


def test_auto_dtype_is_recorded_as_the_backends_and_keeps_cpu_fingerprints():
    """model.dtype defaults to "auto": float32 on CPU (the fingerprint of a phase recorded with float32 before
    "auto" existed), bfloat16 when resolved for a TPU or GPU (a different result, so a different fingerprint)."""
    recorded = json.loads(pretrain_config("dapt").to_json_best_effort())
    recorded["model"]["dtype"] = "float32"
    cpu = config_loader.finalize(pretrain_config("dapt"), platform="cpu")
    assert cpu.model.dtype == "float32" and fingerprint(cpu) == fingerprint(recorded)
    for platform in ("tpu", "gpu"):
        assert config_loader.finalize(pretrain_config("dapt"), platform=platform).model.dtype == "bfloat16"
    tpu = config_loader.finalize(pretrain_config("dapt"), ["--config.model.dtype=float32"], platform="tpu")
    assert tpu.model.dtype == "float32" and fingerprint(tpu) == fingerprint(recorded)  # explicit values stay


@pytest.mark.parametrize(
    "command, expected",
    [
        (
            ["pretrain", "--config", "configs/dapt.py:biomed", "--config.init=/nonexistent/model"],
            "error: init='/nonexistent/model' is neither",
        ),
        (
            ["finetune", "--config", "configs/finetune.py:chemprot", "--config.train.metric=f1"],  # before any training
            "error: train.metric='f1' must be one of accuracy, macro_f1, micro_f1",
        ),
    ],
)
def test_cli_reports_bad_input_in_one_line_and_exit_code_2(command, expected):
    out = subprocess.run([sys.executable, "-m", "dontstop_jax", *command], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    assert out.stderr.strip().startswith(expected)
    assert len(out.stderr.strip().splitlines()) == 1
