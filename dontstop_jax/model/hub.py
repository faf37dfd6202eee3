"""Hugging Face Hub model ids as `init` or `tokenizer` (`roberta-base`, `allenai/biomed_roberta_base@<revision>`).

huggingface_hub downloads into its own cache and honours HF_HOME, HF_HUB_CACHE and HF_HUB_OFFLINE itself; this
module only names the files we load (never a repo's TF/Flax/ONNX weights) and turns its failures into one line.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from dontstop_jax.errors import UserError

TOKENIZER_FILES = [
    "vocab.json",
    "merges.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
]
# Top-level files only ("model*" keeps out onnx/ and other subfolders); pytorch_model.bin only when a repo has
# no safetensors, so roberta-base's weights are not fetched twice.
SAFETENSORS = ["config.json", "model*.safetensors", "model.safetensors.index.json", *TOKENIZER_FILES]
TORCH_BIN = ["pytorch_model.bin"]
_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?(@[\w./-]+)?")


def looks_like_hub_id(s: str) -> bool:
    """True for `name`, `org/name` or either with `@revision`, when no such local path exists (a local
    directory always wins, so `roberta-base/` in the working directory is read as a directory)."""
    return s != "scratch" and _ID.fullmatch(s) is not None and not os.path.exists(s)


def local(path_or_id: str, field: str = "init") -> str:
    """`path_or_id` itself, or the local snapshot directory when it names a Hub model."""
    return str(snapshot(path_or_id, field)) if looks_like_hub_id(path_or_id) else path_or_id


def snapshot(repo_id: str, field: str = "init") -> Path:
    """The cached snapshot directory of Hub model `repo_id` (`id` or `id@revision`), downloaded if missing. No
    collective here (a caller on one process only must not hang): a multi-process caller lets process 0 go first
    (train/source.py)."""
    path = _fetch(repo_id, SAFETENSORS, field)
    if not any(path.glob("model*.safetensors")):  # an older repo: PyTorch weights only
        path = _fetch(repo_id, TORCH_BIN, field)
    return path


def config_only(repo_id: str, field: str = "init") -> Path:
    """A snapshot directory holding at least the model's config.json (what `dontstop plan` reads; no weights)."""
    return _fetch(repo_id, ["config.json"], field)


def provenance(repo_id: str, path: Path) -> str:
    """`hf:<repo>@<commit>`: the snapshot directory is named by its commit, so a moving branch is pinned."""
    return f"hf:{repo_id.partition('@')[0]}@{path.name}"


def _fetch(spec: str, patterns: list[str], field: str) -> Path:
    """snapshot_download of `patterns`, its errors as one line naming the id and what to do."""
    from huggingface_hub import constants, errors, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo, _, revision = spec.partition("@")
    where = f"{field}={spec!r} is not a local directory, and"
    command = f"hf download {repo}" + (f" --revision {revision}" if revision else "")
    try:
        return Path(snapshot_download(repo, revision=revision or None, allow_patterns=patterns))
    except LocalEntryNotFoundError as err:
        why = "HF_HUB_OFFLINE=1" if constants.HF_HUB_OFFLINE else "the Hub cannot be reached"
        partial = isinstance(err, getattr(errors, "IncompleteSnapshotError", ()))  # huggingface_hub >= 1.x
        state = "only partly in" if partial else "not in"
        raise UserError(
            f"{where} Hugging Face Hub model {repo} is {state} the cache {constants.HF_HUB_CACHE} "
            f"({why}); run `{command}` on a machine with network and copy its cache (HF_HOME) "
            f"here, or point {field} at a local model directory"
        ) from None
    except GatedRepoError:
        raise UserError(
            f"{where} Hugging Face Hub model {repo} is gated; accept its terms on the Hub and log in "
            f"(`hf auth login`), or point {field} at a local model directory"
        ) from None
    except RepositoryNotFoundError:
        raise UserError(
            f"{where} the Hugging Face Hub has no model {repo} (or it is private); check the id or the path"
        ) from None
    except RevisionNotFoundError:
        raise UserError(
            f"{where} Hugging Face Hub model {repo} has no revision {revision!r}; use a branch, tag or commit it has"
        ) from None
    except (HfHubHTTPError, OSError, ValueError) as err:  # a malformed id (ValueError), a full disk, a Hub error
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(
            f"{where} fetching Hugging Face Hub model {repo} failed ({reason}); retry, or point "
            f"{field} at a local model directory"
        ) from None
