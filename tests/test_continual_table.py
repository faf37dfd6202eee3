"""The continual table's spread over seeds: each seed's own final average, forgetting, BWT and FWT, as mean ±
sample std, against a direct computation; and the table printed again from a run's continual.json."""

import json

import numpy as np
import pytest

from dontstop_jax.analysis.continual import SUMMARY, ContinualTable, from_json


def test_spread_over_seeds_is_each_seeds_own_table(tmp_path):
    rng = np.random.default_rng(0)
    tasks, seeds = ["t0", "t1", "t2"], (0, 1, 4)
    R = {seed: rng.uniform(size=(3, 3)) for seed in seeds}  # R[seed][stage, task], task i learned at stage i
    for seed, step in ((0, 0.3), (1, -0.3)):  # t0's best earlier score: at stage 1 for seed 0, at stage 0 for seed 1
        R[seed][1, 0] = R[seed][0, 0] + step
    before = {seed: rng.uniform(size=3) for seed in seeds}
    base = {seed: rng.uniform(size=3) for seed in seeds}
    records = [
        {"method": "m", "stage": s, "task": t, "seed": seed, "score": float(R[seed][s, i]), "when": "after"}
        for seed in seeds
        for i, t in enumerate(tasks)
        for s in range(i, 3)
    ]
    records += [
        {"method": "m", "stage": i - 1, "task": t, "seed": seed, "score": float(before[seed][i]), "when": "before"}
        for seed in seeds
        for i, t in enumerate(tasks)
        if i > 0
    ]
    records += [
        {"method": "base", "stage": -1, "task": t, "seed": seed, "score": float(base[seed][i]), "when": "base"}
        for seed in seeds
        for i, t in enumerate(tasks)
    ]
    direct = {
        seed: [
            R[seed][2].mean(),
            np.mean([max(R[seed][i:2, i]) - R[seed][2, i] for i in (0, 1)]),
            np.mean([R[seed][2, i] - R[seed][i, i] for i in (0, 1)]),
            np.mean([before[seed][i] - base[seed][i] for i in (1, 2)]),
        ]
        for seed in seeds
    }
    table = ContinualTable.from_records(records, ["m"], ["x", "y", "z"], tasks)
    for k, name in enumerate(SUMMARY):
        values = [direct[seed][k] for seed in seeds]
        assert table.spread["m"][name] == pytest.approx([np.mean(values), np.std(values, ddof=1), 3])
    # The main table is the seed-mean curve's: its forgetting is not the mean of the seeds' forgetting.
    forgetting = table.spread["m"]["forgetting"]
    assert forgetting is not None and table.forgetting("m") != pytest.approx(forgetting[0])
    bwt = table.spread["m"]["BWT"]
    assert bwt is not None
    mean, std, _ = bwt
    assert f"{100 * mean:.1f} ± {100 * std:.1f}" in table.to_markdown()

    path = tmp_path / "continual.json"
    path.write_text(json.dumps({**table.to_json(), "records": records}))
    assert from_json(str(path)).to_markdown() == table.to_markdown()
    one = ContinualTable.from_records([r for r in records if r["seed"] == 0], ["m"], ["x", "y", "z"], tasks)
    one_bwt = one.spread["m"]["BWT"]
    assert one_bwt is not None and one_bwt[1] is None and "± n/a" in one.to_markdown()
