"""The README's main command, `dontstop demo`, run in full: it shows the paper's four findings.

The benchmark's labels depend on word clusters that only unlabeled domain/task text reveals (dev/test use
words never seen with a label). Each claim must hold by more than two standard deviations of the seeds:
DAPT and TAPT each beat the baseline, DAPT+TAPT beats DAPT and TAPT alone, and DAPT on the task's own domain
beats DAPT on an irrelevant domain (not-DAPT).
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dontstop_jax.analysis import significance

pytestmark = pytest.mark.slow


# (winner, loser): the paper's findings, each a significant gap on every task.
FINDINGS = [
    ("dapt", "baseline"),
    ("tapt", "baseline"),
    ("dapt_tapt", "dapt"),
    ("dapt_tapt", "tapt"),
    ("dapt", "not_dapt"),
]


def test_dapt_and_tapt_help_dapt_tapt_helps_most_and_not_dapt_does_not(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "dontstop_jax",
            "demo",
            f"--config.workdir={tmp_path / 'grid'}",
            f"--config.synthetic.directory={tmp_path / 'benchmark'}",
        ],
        cwd=Path(__file__).parents[1],
        capture_output=True,
        text=True,
        timeout=2400,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    print(out.stdout)
    records = json.loads((tmp_path / "grid" / "records.json").read_text())["records"]
    for task in {r["task"] for r in records}:
        for winner, loser in FINDINGS:
            result = significance(records, task, winner, loser, metric="macro_f1")
            assert result.significant, (task, winner, loser, result)
