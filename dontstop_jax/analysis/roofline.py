"""A roofline estimate of one step from its compiled cost: the slowest of compute, HBM traffic and ICI traffic.

An estimate, not a measurement: it assumes each resource runs at its published peak and nothing overlaps
badly. Compute and HBM times come from the FLOPs and bytes counted in the step's HLO with every loop's trip
count (analysis/hlo.py), so full remat's recomputation is in them; MFU divides the model's own FLOPs (PaLM's
convention, no recomputation) by what the chips could do in the estimated step time.
"""

from __future__ import annotations

import dataclasses

from dontstop_jax.analysis.plan import StepCost
from dontstop_jax.engine.topology import Chip
from dontstop_jax.model import ModelConfig

GIB = 1 << 30


def model_flops(arch: ModelConfig, params: int, batch: int, seq: int, predicted: int) -> float:
    """Training FLOPs of one step (PaLM's convention): 6 x non-embedding parameters x tokens, attention's
    12 x layers x seq x hidden per token, and the tied vocabulary projection at the `predicted` slots only."""
    embeddings = (arch.vocab_size + arch.max_position_embeddings + arch.type_vocab_size) * arch.hidden_size
    tokens = batch * seq
    return (
        6 * (params - embeddings) * tokens
        + 12 * arch.num_hidden_layers * seq * arch.hidden_size * tokens
        + 6 * arch.vocab_size * arch.hidden_size * batch * predicted
    )


@dataclasses.dataclass
class Roofline:
    compute_s: float
    hbm_s: float
    ici_s: float

    @property
    def step_s(self) -> float:
        return max(self.compute_s, self.hbm_s, self.ici_s)

    @property
    def bound(self) -> str:
        return max((self.compute_s, "compute"), (self.hbm_s, "HBM"), (self.ici_s, "ICI"))[1]


def roofline(cost: StepCost, chip: Chip) -> Roofline:
    # A ring all-reduce moves its bytes twice (reduce-scatter, then all-gather); the others once.
    ici = sum(b * (2 if kind == "all-reduce" else 1) for kind, (_, b) in cost.collectives.items())
    return Roofline(cost.flops / chip.peak_flops, cost.bytes_accessed / chip.hbm_bandwidth, ici / chip.ici_bandwidth)


def mfu(model_step_flops: float, step_s: float, chip: Chip, chips: int) -> float:
    """Model FLOPs utilisation: the model's FLOPs per step over what `chips` do at peak in `step_s`."""
    return model_step_flops / (step_s * chip.peak_flops * chips)


def memory_line(cost: StepCost, chip: Chip) -> str:
    return (
        f"{cost.argument_bytes / GIB:.2f} GiB state+batch, {cost.temp_bytes / GIB:.2f} GiB temporaries, "
        f"{cost.total_bytes / GIB:.2f} GiB total of {chip.hbm_bytes / GIB:.0f} GiB "
        f"({cost.total_bytes / chip.hbm_bytes:.0%})"
    )


def collectives_line(cost: StepCost) -> str:
    if not cost.collectives:
        return "none"
    return ", ".join(f"{kind} {n}x {b / 2**20:.1f} MiB" for kind, (n, b) in sorted(cost.collectives.items()))
