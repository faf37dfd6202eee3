"""Load a Hugging Face fast tokenizer and describe it for caching, packing and masking.

A directory (local or in a bucket), or a Hub id that huggingface_hub fetches into its cache (HF_HUB_OFFLINE=1:
the cache only).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence

from transformers import PreTrainedTokenizerFast

from dontstop_jax import files
from dontstop_jax.errors import UserError


def load_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerFast:
    """Load the fast tokenizer saved in directory `path` (tokenizer.json, or vocab.json + merges.txt; a bucket
    directory is read through this host's copy), or in the snapshot of Hub model `path` (`roberta-base`,
    `org/name@revision`)."""
    from dontstop_jax.model import hub

    path = hub.local(os.fspath(path), "tokenizer")
    if not files.path(path).is_dir():
        raise UserError(f"tokenizer directory {path} not found; pass a directory save_pretrained wrote, or a Hub id")
    path = files.localize(path)
    try:
        if _plain_backend(path):
            tok = PreTrainedTokenizerFast.from_pretrained(os.fspath(path), local_files_only=True)
        else:
            from transformers import AutoTokenizer  # (imports torch where installed: seconds per process)

            tok = AutoTokenizer.from_pretrained(os.fspath(path), local_files_only=True)
    except (OSError, ValueError) as e:
        reason = str(e).strip().splitlines()[0]
        raise UserError(f"cannot load a tokenizer from {path} ({reason}); the directory needs tokenizer.json") from e
    if not isinstance(tok, PreTrainedTokenizerFast):
        raise UserError(f"tokenizer in {path} is not a fast (Rust) tokenizer; save one with tokenizer.json")
    # A tokenizer.json may carry truncation/padding settings; raw encoding of long documents must not be cut.
    tok.backend_tokenizer.no_truncation()
    tok.backend_tokenizer.no_padding()
    return tok


def _plain_backend(path: str | os.PathLike) -> bool:
    """Whether the directory holds the generic fast tokenizer that AutoTokenizer would load as it is: its
    tokenizer_config.json names the generic backend class, with no custom code and no model config.json that could
    pick a model's own class. Such a directory is loaded without AutoTokenizer, whose import pulls in torch where it
    is installed (seconds of start-up for every command)."""
    directory = files.path(path)
    config = directory / "tokenizer_config.json"
    if not (directory / "tokenizer.json").exists() or not config.exists() or (directory / "config.json").exists():
        return False
    try:
        settings = json.loads(config.read_text(encoding="utf-8"))
    except ValueError:
        return False
    return settings.get("tokenizer_class") in (PreTrainedTokenizerFast.__name__, "PreTrainedTokenizerFast") and (
        "auto_map" not in settings
    )


def special_ids(tok: PreTrainedTokenizerFast) -> dict[str, int]:
    """Ids of the special tokens packing and masking need: bos (or cls), eos (or sep), pad, mask, unk."""
    ids = {
        "bos": tok.bos_token_id if tok.bos_token_id is not None else tok.cls_token_id,
        "eos": tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id,
        "pad": tok.pad_token_id,
        "mask": tok.mask_token_id,
        "unk": tok.unk_token_id,
    }
    missing = [name for name, i in ids.items() if i is None]
    if missing:
        raise UserError(
            f"tokenizer has no {'/'.join(missing)} token; "
            "use a RoBERTa-style tokenizer with <s> </s> <pad> <mask> <unk>"
        )
    return ids


def tokenizer_fingerprint(tok: PreTrainedTokenizerFast) -> str:
    """Hash of everything that decides token ids, so prepared corpora are never reused with another tokenizer."""
    payload = tok.backend_tokenizer.to_str() + json.dumps(special_ids(tok), sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def encode_plain(tok: PreTrainedTokenizerFast, texts: Sequence[str]) -> list[list[int]]:
    """Token ids without special tokens: callers add <s>/</s> so the layout never depends on the post-processor."""
    return [e.ids for e in tok.backend_tokenizer.encode_batch(list(texts), add_special_tokens=False)]
