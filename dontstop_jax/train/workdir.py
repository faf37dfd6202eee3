"""A phase's workdir contract: the config that made it, its completion marker, and no silent drift.

    WORKDIR/phase_config.json  the full config of the run and its fingerprint, recorded when the phase starts
    WORKDIR/DONE.json          the phase's summary, written last: only a workdir holding it is a finished phase

A rerun with the same config resumes an interrupted phase or returns a finished one's summary. A rerun whose
config differs in anything that shapes the result is refused, naming the fields: resuming under new settings
would mix two runs, and returning the old summary would report settings that never ran.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import jax
from ml_collections import ConfigDict

from dontstop_jax.errors import UserError
from dontstop_jax.files import read_json, write_json

DONE, CONFIG = "DONE.json", "phase_config.json"
# Fields (dotted paths, a section stands for all its fields) that never change what a phase produces: its
# name and place, logging, checkpoint cadence, the mesh (any mesh resumes any checkpoint), rematerialisation
# (same math) and where caches live.
RUNTIME_ONLY = ("name", "workdir", "train.log_every", "checkpoint", "mesh", "model.remat", "data.cache_dir",
                "checkpoint_every")


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict) and tree:
        return {k: v for key, sub in tree.items() for k, v in _flatten(sub, f"{prefix}{key}.").items()}
    return {prefix[:-1]: tree}


def _runtime_only(field: str) -> bool:
    return any(field == r or field.startswith(r + ".") for r in RUNTIME_ONLY)


def result_fields(config: ConfigDict | dict) -> dict[str, Any]:
    """{dotted field: value} of everything in `config` that shapes a phase's result (JSON-normalised)."""
    tree = json.loads(config.to_json_best_effort()) if isinstance(config, ConfigDict) else config
    return {k: v for k, v in _flatten(tree).items() if not _runtime_only(k)}


def fingerprint(config: ConfigDict | dict) -> str:
    """Hash of what determines a phase's result (not where it is written, what it is called or how it logs)."""
    return hashlib.sha256(json.dumps(result_fields(config), sort_keys=True).encode()).hexdigest()[:10]


def finished(workdir: str | Path) -> dict | None:
    """The summary of a phase that completed in `workdir`, or None."""
    path = Path(workdir) / DONE
    return read_json(path) if path.exists() else None


def require_finished(workdir: str | Path, what: str) -> dict:
    """The summary of the finished phase in `workdir`; a one-line error if it never finished."""
    if (summary := finished(workdir)) is None:
        raise UserError(f"{what}={str(workdir)!r} is a phase that has not finished (no {DONE}); rerun the command "
                        "that trains it until it completes, then start from it")
    return summary


class Workdir:
    """The workdir of one phase run with `config` (its `workdir` and `name` fields)."""

    def __init__(self, config: ConfigDict):
        self.path, self.phase, self.config = Path(config.workdir), config.name, config

    def claim(self) -> dict | None:
        """Check the config against the one recorded here (a difference in a result field is an error) and
        record it; returns the summary when the phase already finished with this config, else None."""
        recorded = self.path / CONFIG
        if recorded.exists():
            self._check_drift(read_json(recorded)["config"])
        elif jax.process_index() == 0:
            write_json(recorded, {"phase": self.phase, "fingerprint": fingerprint(self.config),
                                  "config": json.loads(self.config.to_json_best_effort())})
        return finished(self.path)

    def _check_drift(self, recorded: dict) -> None:
        old, new = result_fields(recorded), result_fields(self.config)
        changed = sorted(k for k in old.keys() | new.keys() if old.get(k, "<absent>") != new.get(k, "<absent>"))
        if changed:
            shown = ", ".join(f"{k}: {_short(old.get(k, '<absent>'))} -> {_short(new.get(k, '<absent>'))}"
                              for k in changed[:6]) + (f" and {len(changed) - 6} more" if len(changed) > 6 else "")
            state = "finished" if finished(self.path) is not None else "was started"
            raise UserError(f"{self.path} {state} with another config ({shown}); use a new workdir "
                            f"(--config.workdir=...) or rerun with the config recorded in {self.path / CONFIG}")

    def complete(self, summary: dict) -> dict:
        """Mark the phase finished (the first process writes; the marker is the last file a phase writes)."""
        if jax.process_index() == 0:
            write_json(self.path / DONE, summary)
        return summary


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."
