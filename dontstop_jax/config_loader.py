"""`configs/file.py:arg` loading and `--config.a.b=value` overrides, where a typo is an error."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

from ml_collections import ConfigDict

from dontstop_jax.errors import UserError


def load(spec: str) -> ConfigDict:
    """`path/to/config.py` or `path/to/config.py:arg` -> that file's get_config(arg)."""
    path, _, arg = spec.partition(":")
    if not Path(path).is_file():
        raise UserError(f"config file {path!r} does not exist; pass e.g. configs/dapt.py:biomed")
    module_spec = importlib.util.spec_from_file_location(f"_dontstop_config_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise UserError(f"{path} has no get_config(); every config file defines get_config(arg)")
    return module.get_config(arg) if arg else module.get_config()


def _parse(raw: str, current):
    if isinstance(current, str) and not raw.startswith(("[", "(", "{")):
        return raw
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw  # a bare word: a string
    if isinstance(current, tuple) and isinstance(value, list):
        value = tuple(value)
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    return value


def override(cfg: ConfigDict, key: str, raw: str) -> None:
    """Set cfg[a][b] = parse(raw) for key 'a.b'; unknown keys and wrong types are one-line errors."""
    node, parts = cfg, key.split(".")
    for i, part in enumerate(parts):
        if not isinstance(node, ConfigDict) or part not in node:
            where = ".".join(parts[:i]) or "config"
            known = sorted(node.keys()) if isinstance(node, ConfigDict) else []
            raise UserError(f"--config.{key}: {where} has no field {part!r}; known fields: {', '.join(known)}")
        if i < len(parts) - 1:
            node = node[part]
    leaf = parts[-1]
    value = _parse(raw, node[leaf])
    try:
        node[leaf] = value
    except TypeError as err:
        raise UserError(f"--config.{key}={raw!r}: {err}") from None


def apply_overrides(cfg: ConfigDict, args: list[str]) -> ConfigDict:
    """args like ['--config.train.steps=100', '--config.init', 'path'] (both spellings)."""
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--config."):
            raise UserError(f"unexpected argument {arg!r}; overrides look like --config.train.steps=100")
        key, eq, raw = arg[len("--config."):].partition("=")
        if not eq:
            if i + 1 >= len(args):
                raise UserError(f"{arg} needs a value: {arg}=VALUE")
            raw, i = args[i + 1], i + 1
        override(cfg, key, raw)
        i += 1
    return cfg
