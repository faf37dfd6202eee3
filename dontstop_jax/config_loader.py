"""Where configs enter: `configs/file.py:arg` loading, `--config.a.b=value` overrides and one check of every
value, so that a typo, a wrong type or a value out of range is a one-line error before any work starts."""

from __future__ import annotations

import ast
import copy
import importlib.util
import re
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
from ml_collections import ConfigDict, FieldReference

from dontstop_jax import fields
from dontstop_jax.errors import UserError
from dontstop_jax.fields import MAPS, default_dtype, undeclared

# A grid task's fields (fields.TASK); `overrides` holds per-task fields of its TAPT and fine-tuning phases.
TASK_FIELDS = tuple(path.rsplit(".", 1)[-1] for path in fields.TASK)
TASK_PHASES = ("tapt", "finetune")
_TYPE_NAMES = {
    int: "an int",
    float: "a number",
    str: "a string",
    bool: "True or False",
    list: "a list",
    tuple: "a list",
    ConfigDict: "a dict",
}


def load(spec: str, overrides: Sequence[str] = (), platform: str | None = None) -> ConfigDict:
    """`path/to/config.py` or `path/to/config.py:arg` -> that file's get_config(arg), overridden and checked."""
    path, _, arg = spec.partition(":")
    if not Path(path).is_file():
        raise UserError(f"config file {path!r} does not exist; pass e.g. configs/dapt.py:biomed")
    return finalize(_get_config(path, arg), overrides, platform)


def finalize(cfg: ConfigDict, overrides: Sequence[str] = (), platform: str | None = None) -> ConfigDict:
    """Apply command-line `overrides`, check every value, resolve the accelerator defaults for `platform` (default:
    the backend this process runs on) and lock (no field can be added afterwards)."""
    return lock(
        accelerator_defaults(validate(apply_overrides(cfg, list(overrides))), platform or jax.default_backend())
    )


def accelerator_defaults(cfg: ConfigDict, platform: str) -> ConfigDict:
    """Every `model.dtype="auto"` in cfg (a phase's, or a grid's phase templates') set to what `platform` computes
    in (model/config.py `default_dtype`), so the recorded config and the fingerprint name the dtype used: float32
    on CPU, exactly what phases recorded before "auto" existed. On a TPU a model whose attention dropout is set to
    0 (the fused path in training too) and whose attention_impl is unset gets the splash kernel."""
    for key, value in cfg.items():
        if key == "model" and isinstance(value, ConfigDict) and "dtype" in value:
            if value.dtype == "auto":
                value.dtype = default_dtype(platform)
            fused = value.get("attention_probs_dropout_prob") == 0 and value.get("attention_impl") is None
            if platform == "tpu" and fused:
                value.attention_impl = "splash"
        elif isinstance(value, ConfigDict):
            accelerator_defaults(value, platform)
    return cfg


def lock(cfg: ConfigDict) -> ConfigDict:
    """Lock cfg and every section in it. (ConfigDict.lock() stops at a locked dict, so a section assigned
    to it since, such as a replaced `domains`, would stay open.)"""
    cfg.lock()
    for value in cfg.values():
        if isinstance(value, ConfigDict):
            lock(value)
    return cfg


def _get_config(path: str, arg: str) -> ConfigDict:
    """Run the config file; its exceptions (e.g. an unknown arg, a syntax error) become `path:line: message`."""
    try:
        module_spec = importlib.util.spec_from_file_location(f"_dontstop_config_{Path(path).stem}", path)
        assert module_spec is not None and module_spec.loader is not None  # a file path always has a spec and loader
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        get_config = getattr(module, "get_config", None)
        cfg = get_config and (get_config(arg) if arg else get_config())
    except SyntaxError as err:
        raise UserError(f"{err.filename}:{err.lineno}: {err.msg}") from None
    except Exception as err:  # whatever the file raises: one line naming where
        file = Path(path).resolve()
        lines = [f.lineno for f in traceback.extract_tb(err.__traceback__) if Path(f.filename).resolve() == file]
        where = f"{path}:{lines[-1]}" if lines else path
        text = str(err) if isinstance(err, (ValueError, UserError)) else f"{type(err).__name__}: {err}"
        raise UserError(f"{where}: {' '.join(_not_a_field(text).split())}") from None
    if get_config is None:
        raise UserError(f"{path} has no get_config(); every config file defines get_config(arg)")
    if not isinstance(cfg, ConfigDict):
        raise UserError(f"{path}: get_config() returned {cfg!r:.60}, not a ConfigDict")
    return cfg


def _not_a_field(text: str) -> str:
    """ml_collections' error for a new field on a locked config lists the repr of every field (pages, not a
    line): keep its gist."""
    if not (key := re.search(r'Key "([^"]+)" does not exist and cannot be added', text)):
        return text
    hint = re.search(r'Did you mean "([^"]+)"', text)
    return f"{key[1]!r} is not a field (configs are locked: no field can be added)" + (
        f"; did you mean {hint[1]!r}?" if hint else ""
    )


def validate(cfg: ConfigDict, prefix: str = "", declared_as: str | None = None) -> ConfigDict:
    """Check every field, in every nested section, against its declaration in fields.py (a field declared
    nowhere is an error), with None only where a field is declared a placeholder; `declared_as` is the path
    prefix its declarations have (default `prefix`). A grid's method_overrides and its tasks' overrides must be
    valid fields of their phases too."""
    under = prefix if declared_as is None else declared_as
    if "method_overrides" in cfg and "finetune" in cfg:
        for method, part in cfg.method_overrides.items():
            where = f"{prefix}method_overrides.{method}."
            validate(set_fields(copy.deepcopy(cfg.finetune), part, where), where, f"{under}finetune.")
    for name, task in (cfg.get("tasks") or {}).items():
        _validate_task(cfg, name, task, prefix, under)
    for key, value in cfg.items(preserve_field_references=True):
        path, name = f"{prefix}{key}", f"{under}{key}"
        if isinstance(value, FieldReference):
            value = value.get()
        elif value is None:
            raise UserError(f"{path}=None: this field needs a value")
        field = fields.declared(name)
        if field is None and isinstance(value, ConfigDict):
            validate(value, f"{path}.", f"{name}.")
            continue
        if field is None:
            raise UserError(undeclared(path))
        if field.keyed and key == "tasks":  # a grid's tasks: each entry's fields are declared as tasks.*.FIELD
            for task, spec in value.items():
                validate(spec, f"{path}.{task}.", "tasks.*.")
        elif field.rule and not _holds(field.rule[0], value):
            raise UserError(f"{path}={value!r} {field.rule[1]}")
        _check_urls(value, path)
    return cfg


def _check_urls(value: Any, path: str) -> None:
    """Every string in `value` (a list, a map's entries) that looks like a gs:// URL must be one."""
    if isinstance(value, (ConfigDict, dict)):
        for key, sub in value.items():
            _check_urls(sub, f"{path}.{key}")
    for text in value if isinstance(value, (list, tuple)) else [value]:
        if isinstance(text, str):
            check_url(text, path)


_BUCKET = re.compile(r"[a-z0-9][a-z0-9._-]{1,61}[a-z0-9]")


def check_url(text: str, where: str) -> None:
    """A gs:// URL (any field, --from/--to) names a bucket and a path: `gs://`, `gs:/x`, `gs:///x`, a bucket with
    spaces or capitals, `gs://b//x` or a stray newline is refused here, before any work, not met as a network
    traceback later."""
    if not text[:3].lower() == "gs:":
        return
    bucket, _, rest = text[5:].partition("/") if text.startswith("gs://") else ("", "", "")
    why = (
        "it must start with gs:// (lowercase, two slashes)"
        if not text.startswith("gs://")
        else "it names no bucket"
        if not bucket
        else f"bucket name {bucket!r} is not one (3-63 lowercase letters, digits, '-', '_' or '.')"
        if not _BUCKET.fullmatch(bucket)
        else "it holds a control character or a trailing space"
        if any(c < " " for c in text) or text != text.rstrip()
        else "it has an empty path segment (//)"
        if "//" in f"/{rest}"
        else None
    )
    if why:
        raise UserError(f"{where}={text!r} is not a bucket URL: {why}; write gs://BUCKET/PATH")


def _validate_task(cfg: ConfigDict, name: str, task: ConfigDict, prefix: str, under: str) -> None:
    """A grid task has known fields only, and its `overrides` set real fields of the grid's TAPT and fine-tuning
    phases, e.g. {"tapt": {"train": {"epochs": 20}}, "finetune": {"train": {"steps_per_epoch": 2000}}}."""
    where = f"{prefix}tasks.{name}"
    if unknown := sorted(set(task) - set(TASK_FIELDS)):
        raise UserError(f"{where} has unknown field(s) {', '.join(unknown)}; task fields: {', '.join(TASK_FIELDS)}")
    for phase, part in (task.get("overrides") or {}).items():
        if phase not in TASK_PHASES or phase not in cfg:
            raise UserError(f"{where}.overrides.{phase}: a task overrides only its {' and '.join(TASK_PHASES)} phases")
        validate(
            set_fields(copy.deepcopy(cfg[phase]), part, f"{where}.overrides.{phase}."),
            f"{where}.overrides.{phase}.",
            f"{under}{phase}.",
        )


def _holds(test: Any, value: Any) -> bool:
    try:
        return bool(test(value))
    except TypeError:  # e.g. a comparison with a value of a config file's own (untyped) field
        return False


def set_fields(cfg: ConfigDict, fields: Mapping[str, Any], where: str = "", context: str = "") -> ConfigDict:
    """Set `fields` ({"train.steps": 5, "optim": {"learning_rate": 1e-3}}) on cfg in place and return it. Keys
    must exist (also on an unlocked config), a section takes a dict of its fields, a value the field's type."""
    for key, value in fields.items():
        node, leaf = _find(cfg, key, where, context)
        _assign(node, leaf, value, f"{where}{key}", context)
    return cfg


def _find(cfg: ConfigDict, key: str, where: str, context: str) -> tuple[ConfigDict, str]:
    """The section holding dotted `key` and the field's name in it."""
    node, parts = cfg, key.split(".")
    for i, part in enumerate(parts):
        if not isinstance(node, ConfigDict) or part not in node:
            parent = (where + ".".join(parts[:i])).strip(".") or "config"
            known = f"; known fields: {', '.join(sorted(node.keys()))}" if isinstance(node, ConfigDict) else ""
            raise UserError(f"{context}{parent} has no field {part!r}{known}")
        if i < len(parts) - 1:
            node = node[part]
    return node, parts[-1]


def _assign(node: ConfigDict, leaf: str, value: Any, path: str, context: str) -> None:
    declared = node.get_type(leaf)
    if declared is ConfigDict and leaf not in MAPS:
        if not isinstance(value, (dict, ConfigDict)):
            fields = sorted(node[leaf].keys())
            raise UserError(
                f"{context}{path} is a section; set its fields, e.g. --config.{path}.{fields[0]}=VALUE "
                f"(fields: {', '.join(fields)})"
            )
        set_fields(node[leaf], value, f"{path}.", context)
        return
    try:
        if isinstance(value, bool) and declared in (int, float):
            raise TypeError
        node[leaf] = value
    except TypeError:
        raise UserError(
            f"{context}{path} must be {_TYPE_NAMES.get(declared, 'a ' + declared.__name__)}, got {value!r}"
        ) from None


def _parse(raw: str, declared: type) -> Any:
    """A string field takes the text as it is; other fields a Python literal (a bare word stays a string)."""
    if declared is str:
        return raw
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw


def override(cfg: ConfigDict, key: str, raw: str) -> None:
    """Set cfg[a][b] = parse(raw) for key 'a.b'; unknown keys, sections and wrong types are one-line errors."""
    node, leaf = _find(cfg, key, "", f"--config.{key}: ")
    _assign(node, leaf, _parse(raw, node.get_type(leaf)), key, f"--config.{key}={raw}: ")


def apply_overrides(cfg: ConfigDict, args: list[str]) -> ConfigDict:
    """args like ['--config.train.steps=100', '--config.init', 'path'] (both spellings)."""
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--config."):
            raise UserError(f"unexpected argument {arg!r}; overrides look like --config.train.steps=100")
        key, eq, raw = arg[len("--config.") :].partition("=")
        if not eq:
            if i + 1 >= len(args):
                raise UserError(f"{arg} needs a value: {arg}=VALUE")
            raw, i = args[i + 1], i + 1
        override(cfg, key, raw)
        i += 1
    return cfg
