"""The config schema: every shipped config loads typed, checked and locked, and bad input (a wrong type, a
section set to a value, an unknown field, a value out of range, a broken config file) is one `error:` line and
exit code 2 when the config loads, before any work. Fast: nothing trains."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
from ml_collections import ConfigDict

from dontstop_jax import config_loader
from dontstop_jax.errors import UserError
from dontstop_jax.phases.continual import Continual, synthetic_config
from dontstop_jax.phases.defaults import finetune_config, pretrain_config, select_config
from dontstop_jax.phases.grid import phase_config
from dontstop_jax.train.workdir import fingerprint

ROOT = Path(__file__).parents[1]
SHIPPED = {
    "analyze": ["synthetic", "synthetic-tiny", "paper", "custom"],
    "continual": ["synthetic", "tiny"],
    "dapt": ["biomed", "cs", "news", "reviews"],
    "grid": ["paper"],
    "select": ["knn", "rand", "dsir", "curated"],
    "finetune": ["chemprot", "rct", "acl_arc", "sciie", "hyperpartisan", "agnews", "helpfulness", "imdb"],
    "synthetic": ["default", "tiny"],
    "tapt": ["chemprot"],
}


def _sections(cfg: ConfigDict, path: str = "config"):
    yield path, cfg
    for key, value in cfg.items():
        if isinstance(value, ConfigDict):
            yield from _sections(value, f"{path}.{key}")


def test_the_list_of_shipped_configs_is_complete():
    assert set(SHIPPED) == {p.stem for p in (ROOT / "configs").glob("*.py")}


@pytest.mark.parametrize("spec", [f"{name}.py:{arg}" for name, args in SHIPPED.items() for arg in args])
def test_every_shipped_config_loads_checked_typed_and_locked(spec):
    cfg = config_loader.load(f"{ROOT}/configs/{spec}")
    for path, section in _sections(cfg):
        assert section.is_locked and section.is_type_safe, path
    assert config_loader.validate(cfg) is cfg
    with pytest.raises(AttributeError, match="cannot be added since the config is locked"):
        cfg.newfield = 1


def test_fields_cannot_be_added_at_run_time():
    for cfg in (pretrain_config("dapt"), pretrain_config("tapt"), select_config(), synthetic_config("tiny")):
        with pytest.raises(AttributeError):
            cfg.newfield = 1
        with pytest.raises(KeyError):
            cfg["newfield"] = 1
    with pytest.raises(AttributeError):
        pretrain_config("dapt").train.newfield = 1


def test_phases_set_declared_fields_only():
    dapt = pretrain_config("dapt")
    phase = phase_config(dapt, Path("runs"), "dapt-bio", init="base", **{"train.steps": 5, "data.sources": ["a.txt"]})
    assert (phase.name, phase.init, phase.train.steps, list(phase.data.sources)) == ("dapt-bio", "base", 5, ["a.txt"])
    assert phase.is_locked and dapt.train.steps == 12500
    with pytest.raises(UserError, match="train has no field 'stpes'; known fields: .*steps"):
        phase_config(dapt, Path("runs"), "x", **{"train.stpes": 5})
    with pytest.raises(UserError, match="train.steps must be an int, got '5'"):
        phase_config(dapt, Path("runs"), "x", **{"train.steps": "5"})


def test_continual_stages_set_the_declared_das_fields():
    cfg = synthetic_config("tiny")
    cfg.domains = {d: [f"{d}.txt"] for d in cfg.sequence}
    cfg.frozen = ["lm_head"]
    continual = Continual(config_loader.lock(cfg))
    das = continual._adapt_phase("das", "base", "bio", objective="das", das=cfg.das)
    ncl = continual._adapt_phase("dapt", "base", "bio")
    assert (das.objective, ncl.objective) == ("das", "mlm")
    assert list(das.frozen) == list(ncl.frozen) == ["lm_head"] and list(das.data.sources) == ["bio.txt"]
    assert das.das.importance_batches == cfg.das.importance_batches == 4  # the continual config's, not the default
    assert das.workdir != ncl.workdir


def test_tapt_trains_for_epochs_when_steps_is_none():
    tapt = config_loader.load("configs/tapt.py:chemprot")
    assert tapt.train.steps is None and tapt.train.epochs == 100
    config_loader.apply_overrides(tapt, ["--config.train.steps=7"])
    assert tapt.train.steps == 7
    dapt = config_loader.load("configs/dapt.py:biomed", ["--config.train.steps=None"])
    assert dapt.train.steps is None
    with pytest.raises(UserError, match="train.steps must be an int, got 'many'"):
        config_loader.apply_overrides(dapt, ["--config.train.steps=many"])


def test_fields_that_default_to_none_keep_their_type():
    cfg = config_loader.load(
        "configs/finetune.py:rct",
        ["--config.tokenizer=/tok", "--config.model.classifier_dropout=0", "--config.mesh.dcn_shape=[2, 1, 1]"],
    )
    assert cfg.tokenizer == "/tok" and cfg.mesh.dcn_shape == (2, 1, 1)
    assert cfg.model.classifier_dropout == 0.0 and isinstance(cfg.model.classifier_dropout, float)
    with pytest.raises(UserError, match="model.hidden_size must be an int, got 'wide'"):
        config_loader.apply_overrides(cfg, ["--config.model.hidden_size=wide"])


def test_a_dict_replaces_a_map_but_not_a_section():
    cfg = config_loader.load("configs/grid.py:paper", ["--config.domains={'bio': ['b.txt']}"])
    assert list(cfg.domains) == ["bio"] and cfg.domains.is_locked
    config_loader.apply_overrides(cfg, ["--config.finetune.optim={'learning_rate': 1e-3}"])  # sets that field
    assert cfg.finetune.optim.learning_rate == 1e-3 and cfg.finetune.optim.weight_decay == 0.1


@pytest.mark.parametrize(
    "spec, override, message",
    [
        ("dapt.py:biomed", "train.steps=-1", "train.steps=-1 must be > 0 (or None to train for train.epochs)"),
        ("dapt.py:biomed", "train.steps=0", "train.steps=0 must be > 0 (or None to train for train.epochs)"),
        ("tapt.py:chemprot", "train.epochs=0", "train.epochs=0 must be > 0"),
        ("dapt.py:biomed", "train.batch_size=0", "train.batch_size=0 must be > 0"),
        ("dapt.py:biomed", "train.accum_steps=-2", "train.accum_steps=-2 must be > 0"),
        ("dapt.py:biomed", "train.batch_size=None", "train.batch_size=None: this field needs a value"),
        ("dapt.py:biomed", "checkpoint.keep_last=0", "checkpoint.keep_last=0 must be >= 1"),
        ("dapt.py:biomed", "checkpoint.every=-1", "checkpoint.every=-1 must be >= 0"),
        ("dapt.py:biomed", "optim.learning_rate=0", "optim.learning_rate=0.0 must be > 0"),
        ("dapt.py:biomed", "optim.warmup_fraction=1", "optim.warmup_fraction=1.0 must be in [0, 1)"),
        ("dapt.py:biomed", "data.mask_prob=0", "data.mask_prob=0.0 must be in (0, 1)"),
        ("dapt.py:biomed", "data.max_seq_length=0", "data.max_seq_length=0 must be > 0"),
        ("dapt.py:biomed", "objective=elmo", "objective='elmo' must be one of mlm, das, ewc, derpp, hat"),
        ("finetune.py:rct", "train.patience=0", "train.patience=0 must be >= 1"),
        ("finetune.py:rct", "train.metric=f1", "train.metric='f1' must be one of accuracy, macro_f1, micro_f1"),
        (
            "finetune.py:rct",
            "peft.method=prefix",
            "peft.method='prefix' must be one of full, frozen, top_k, bitfit, houlsby, pfeiffer, lora",
        ),
        (
            "finetune.py:rct",
            "model.dtype=float64",
            "model.dtype='float64' must be one of float32, bfloat16, float16, auto",
        ),
        ("finetune.py:rct", "model.remat=all", "model.remat='all' must be one of none, full, dots, dots_no_batch"),
        ("select.py:knn", "method=nope", "method='nope' must be one of knn, rand, dsir, curated"),
        ("select.py:knn", "k=0", "k=0 must be > 0"),
        ("select.py:knn", "chunk_size=0", "chunk_size=0 must be > 0"),
        ("select.py:knn", "checkpoint_every=0", "checkpoint_every=0 must be > 0"),
        ("select.py:knn", "fit_docs=0", "fit_docs=0 must be > 0"),
        # Nested phase sections are checked by the same rules, and named by their full path.
        ("grid.py:paper", "dapt.train.steps=0", "dapt.train.steps=0 must be > 0 (or None to train for train.epochs)"),
        ("grid.py:paper", "finetune.train.batch_size=0", "finetune.train.batch_size=0 must be > 0"),
        ("grid.py:paper", "select.k=-5", "select.k=-5 must be > 0"),
        ("grid.py:paper", "tasks.rct.metric=f1", "tasks.rct.metric='f1' must be one of accuracy, macro_f1, micro_f1"),
        ("grid.py:paper", "seed_discard.keep=0", "seed_discard.keep=0 must be >= 1"),
        (
            "grid.py:paper",
            "method_overrides={'lora': {'optim': {'learning_rate': -1}}}",
            "method_overrides.lora.optim.learning_rate=-1.0 must be > 0",
        ),
        (
            "grid.py:paper",
            "method_overrides={'lora': {'optim': {'learning_rat': 1}}}",
            "method_overrides.lora.optim has no field 'learning_rat'; known fields: b1, b2, eps, learning_rate, "
            "max_grad_norm, warmup_fraction, weight_decay",
        ),
        ("continual.py:tiny", "dapt.train.accum_steps=0", "dapt.train.accum_steps=0 must be > 0"),
    ],
)
def test_values_out_of_range_are_errors_naming_the_field(spec, override, message):
    with pytest.raises(UserError) as err:
        config_loader.load(f"configs/{spec}", [f"--config.{override}"])
    assert str(err.value) == message


def _cli(*args: str) -> str:
    """The CLI's stderr; it must be one `error:` line with exit code 2."""
    out = subprocess.run(
        [sys.executable, "-m", "dontstop_jax", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr[-2000:]
    return out.stderr.strip()


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--config.train.steps=abc"], "error: --config.train.steps=abc: train.steps must be an int, got 'abc'"),
        (
            ["--config.optim.learning_rate=fast"],
            "error: --config.optim.learning_rate=fast: optim.learning_rate must be a number, got 'fast'",
        ),
        (
            ["--config.train=5"],
            "error: --config.train=5: train is a section; set its fields, e.g. "
            "--config.train.accum_steps=VALUE (fields: accum_steps, batch_size, epochs, gather_params_once, "
            "grad_reduce_dtype, log_every, skip_nonfinite, steps, stop_poll_every)",
        ),
        (
            ["--config.train.stpes=5"],
            "error: --config.train.stpes: train has no field 'stpes'; known fields: "
            "accum_steps, batch_size, epochs, gather_params_once, grad_reduce_dtype, log_every, skip_nonfinite, steps, "
            "stop_poll_every",
        ),
        (["--config.train.steps=-1"], "error: train.steps=-1 must be > 0 (or None to train for train.epochs)"),
        (["--config.data.mask_prob=1.5"], "error: data.mask_prob=1.5 must be in (0, 1)"),
    ],
)
def test_cli_rejects_bad_overrides_before_any_work(args, expected):
    # A nonexistent init would be the first error of any work: these must come first.
    assert _cli("pretrain", "--config", "configs/dapt.py:biomed", "--config.init=/nonexistent", *args) == expected


def test_cli_checks_the_demo_config_and_nested_sections():
    assert _cli("demo", "--scale", "tiny", "--config.tapt.train.steps=0") == (
        "error: tapt.train.steps=0 must be > 0 (or None to train for train.epochs)"
    )
    assert _cli("grid", "--config", "configs/grid.py:paper", "--config.finetune.train.batch_size=0") == (
        "error: finetune.train.batch_size=0 must be > 0"
    )


def test_an_unknown_config_arg_lists_the_choices():
    assert re.fullmatch(
        r"error: configs/dapt\.py:\d+: unknown domain 'nosuch'; "
        r"choose from \['biomed', 'cs', 'news', 'reviews'\]",
        _cli("pretrain", "--config", "configs/dapt.py:nosuch"),
    )


@pytest.mark.parametrize(
    "source, line, message",
    [
        ("def get_config(arg):\n    return {'a': 1\n", 2, "'{' was never closed"),  # a syntax error
        (
            "def get_config(arg):\n    if arg != 'x':\n        raise ValueError(f'unknown preset {arg!r}')\n",
            3,
            "unknown preset 'nosuch'",
        ),
        (
            "from dontstop_jax.phases.defaults import pretrain_config\n\n\ndef get_config(arg):\n"
            "    cfg = pretrain_config()\n    cfg.train.stps = 1\n    return cfg\n",
            6,
            "'stps' is not a field (configs are locked: no field can be added); did you mean 'steps'?",
        ),
        ("def get_config(arg):\n    return undefined_name\n", 2, "NameError: name 'undefined_name' is not defined"),
    ],
)
def test_a_broken_config_file_is_one_line_naming_file_and_line(tmp_path, source, line, message):
    path = tmp_path / "broken.py"
    path.write_text(source)
    with pytest.raises(UserError) as err:
        config_loader.load(f"{path}:nosuch")
    assert str(err.value) == f"{path}:{line}: {message}"


def test_a_field_declared_nowhere_fails_at_load_and_at_fingerprint(tmp_path):
    """Adding a field without declaring it (and so how it counts for a phase's result) in fields.py is one line
    naming the field and where to declare it: when its config loads, and when a phase would fingerprint it."""
    message = (
        "train.new_knob is not a declared field; declare it in dontstop_jax/fields.py with its default, doc, "
        "rule and how it counts for a phase's result"
    )
    path = tmp_path / "extra.py"
    path.write_text(
        "from dontstop_jax.phases.defaults import finetune_config\n\n\ndef get_config(arg):\n"
        "    cfg = finetune_config()\n    with cfg.train.unlocked():\n        cfg.train.new_knob = 3\n"
        "    return cfg\n"
    )
    with pytest.raises(UserError) as err:
        config_loader.load(f"{path}:x")
    assert str(err.value) == message
    cfg = finetune_config()
    with cfg.train.unlocked():
        cfg.train.new_knob = 3
    with pytest.raises(UserError) as err:
        fingerprint(cfg)
    assert str(err.value) == message


def test_dontstop_config_shows_each_field_its_doc_and_whether_it_changes_results(capsys):
    from dontstop_jax.cli import main

    assert (
        main(
            [
                "config",
                "--config",
                "configs/finetune.py:chemprot",
                "--diff",
                "--config.head=prompt",
                "--config.regularizer.weight=2",
            ]
        )
        == 0
    )
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]}
    assert set(rows) == {
        "name",
        "workdir",
        "model.dtype",
        "model.hidden_dropout_prob",
        "optim.learning_rate",
        "optim.weight_decay",
        "train.metric",
        "head",
        "regularizer.weight",
    }  # what differs
    assert rows["train.metric"].split()[1:4] == ['"micro_f1"', "yes", "the"]
    assert rows["head"].split()[2] == "yes"
    assert "no: only when regularizer.method != 'none'" in rows["regularizer.weight"]
    assert rows["workdir"].split()[2] == "no" and "where it writes" in rows["workdir"]
    main(["config", "--config", "configs/grid.py:paper"])
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]}
    assert re.search(r"\]\s+-\s+fine-tuning seeds$", rows["seeds"])  # not a phase's field
    assert " yes " in rows["dapt.train.steps"] and " no " in rows["finetune.train.log_every"]


def test_loading_a_config_imports_no_model_engine_or_phase():
    """Reading configs (and `dontstop config`) must not pull in Flax, Orbax or transformers."""
    code = (
        "import sys\nfrom dontstop_jax import config_loader\n"
        "print([m for m in sys.modules if m.startswith('dontstop_jax.phases')])\n"
        "for spec in ('dapt.py:biomed', 'tapt.py:chemprot', 'finetune.py:rct', 'select.py:knn',\n"
        "             'analyze.py:paper', 'grid.py:paper'):\n"
        "    config_loader.load('configs/' + spec)\n"
        "print([m for m in sys.modules if m.split('.')[0] in ('flax', 'orbax', 'transformers')])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.split() == ["[]", "[]"], out.stdout + out.stderr[-2000:]


def test_a_config_file_without_get_config_is_an_error(tmp_path):
    path = tmp_path / "empty.py"
    path.write_text("X = 1\n")
    with pytest.raises(UserError, match=f"^{re.escape(str(path))} has no get_config"):
        config_loader.load(str(path))
