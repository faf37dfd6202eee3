"""The names of the registered continual methods, grid variants and fine-tuning heads, so that a config can be
checked without importing what implements them. The objects live with their owners (phases/continual.py
`METHODS`, phases/grid.py `VARIANTS`, engine/prompt.py `HEADS`), each made by `registry`, which refuses a
registry whose names are not the ones declared here."""

from __future__ import annotations

from typing import Mapping, TypeVar

T = TypeVar("T")

CONTINUAL_METHODS = ("das", "ewc", "derpp", "das_no_general", "das_no_contrast", "das_past_contrast", "das_random",
                     "hat", "demix", "ncl", "one", "adapter_one", "base")
GRID_VARIANTS = ("baseline", "dapt", "tapt", "dapt_tapt", "not_dapt", "transfer_tapt", "knn_tapt_50", "knn_tapt_150",
                 "knn_tapt_500", "rand_tapt", "dsir_tapt", "intermediate", "dapt_intermediate", "tapt_intermediate",
                 "multitask", "dapt_multitask")
HEADS = ("classifier", "prompt")  # finetune.head: a new classification head, or the MLM head through a prompt


def registry(names: tuple[str, ...], entries: Mapping[str, T]) -> dict[str, T]:
    """`entries` as a registry, if its names are exactly `names` in that order (a programming error otherwise:
    an object registered without its name here, or a name with no object)."""
    if tuple(entries) != names:
        raise AssertionError(f"registry {list(entries)} differs from the declared names {list(names)} "
                             "(dontstop_jax/names.py)")
    return dict(entries)
