"""Synthetic domain-shift benchmark: the paper's DAPT/TAPT experiment, offline and CPU-sized.

Labels depend on which cluster a text's content words belong to; labeled train text uses only
"seen" words, dev/test only "unseen" ones, and only the unlabeled domain (or task) text reveals
which unseen word goes with which label. In domain text each cluster also travels with words of
one general topic (its "anchor"), so DAPT finds the clusters in a few hundred MLM steps; task text
never contains anchors, so a model without DAPT/TAPT stays at chance. See `generate.py` for the
on-disk layout and `spec.py` for the knobs.
"""

from dontstop_jax.synthetic.generate import (
    BenchmarkPaths,
    TaskPaths,
    generate_benchmark,
    load_benchmark,
    task_name,
    write_heldout,
)
from dontstop_jax.synthetic.spec import SCALES, BenchmarkSpec, make_spec

__all__ = [
    "SCALES",
    "BenchmarkPaths",
    "BenchmarkSpec",
    "TaskPaths",
    "generate_benchmark",
    "load_benchmark",
    "make_spec",
    "task_name",
    "write_heldout",
]
