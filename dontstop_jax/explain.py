"""`dontstop config`: a resolved config, one field a line, with its doc and whether it changes a phase's result."""

from __future__ import annotations

import json
from typing import Any

from ml_collections import ConfigDict

from dontstop_jax.fields import (
    FIELDS,
    FINETUNE,
    PRETRAIN,
    RUNTIME,
    SELECT,
    SLOTS,
    Field,
    Unset,
    declared,
    flat,
    flatten,
)

_PHASES = (PRETRAIN, FINETUNE, SELECT)


def _phase_table(section: Any) -> dict[str, Field] | None:
    """{path: Field} of the phase whose fields `section` holds, or None when it is not a phase."""
    for table in _PHASES:
        if isinstance(section, dict) and set(section) == set(table):
            return dict(flat(table))
    return None


def _default(field: Field) -> Any:
    return None if isinstance(field.default, Unset) else json.loads(json.dumps(field.default))


def rows(cfg: ConfigDict) -> list[tuple[str, Any, str, Field | None, bool]]:
    """(path, value, whether it changes a phase's result, its declaration, whether it is at its default) of
    every field of `cfg`: a phase's own, or its phase templates' within a grid or continual run."""
    tree = json.loads(cfg.to_json_best_effort())
    roots = {"": tree} if _phase_table(tree) else {f"{k}.": v for k, v in tree.items() if k in SLOTS}
    out = []
    for path, value in flatten(tree).items():
        root = next((r for r in roots if path.startswith(r) and _phase_table(roots[r])), None)
        if root is None:
            field, counts = declared(path, FIELDS), "-"
        else:
            phase = roots[root]
            table = _phase_table(phase)
            assert table is not None  # `root` was chosen among the phases
            field = declared(path[len(root) :], table)
            counts = (
                "yes"
                if field is None or field.counted(value, flatten(phase))
                else "no"
                if field.counts == RUNTIME
                else f"no: {field.counts}"
            )
        at_default = field is not None and value == _default(field)
        out.append((path, value, counts, field, at_default))
    return out


def short(value: Any) -> str:
    """A value as JSON, cut to 32 characters."""
    text = json.dumps(value)
    return text if len(text) <= 32 else text[:29] + "..."


def explain(cfg: ConfigDict, diff: bool = False) -> str:
    """The table `dontstop config` prints (diff: only the fields whose value is not their declared default)."""
    shown = [r for r in rows(cfg) if not (diff and r[4])]
    width, wide = max((len(r[0]) for r in shown), default=0), max((len(r[2]) for r in shown), default=0)
    lines = [
        "changes result: whether the field shapes a phase's result (its fingerprint); '-': not a phase field. "
        "Each field is declared in dontstop_jax/fields.py."
    ]
    for path, value, counts, field, _ in shown:
        lines.append(f"{path:<{width}}  {short(value):<32}  {counts:<{wide}}  {field.doc if field else '(undeclared)'}")
    return "\n".join(lines)
