"""The README's main command, `dontstop demo`, run in full: it shows the paper's effect.

The benchmark's labels depend on word clusters that only unlabeled domain/task text reveals (dev/test use
words never seen with a label), so DAPT+TAPT must beat the baseline by more than two standard deviations
of the seeds, and DAPT on an irrelevant domain (not-DAPT) must not beat DAPT on the task's own domain.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dontstop_jax.analysis import significance

pytestmark = pytest.mark.slow


def test_dapt_tapt_beats_baseline_and_not_dapt_does_not_beat_dapt(tmp_path):
    out = subprocess.run([sys.executable, "-m", "dontstop_jax", "demo", f"--config.workdir={tmp_path / 'grid'}",
                          f"--config.synthetic.directory={tmp_path / 'benchmark'}",
                          "--compilation-cache", str(tmp_path / "xla")],
                         cwd=Path(__file__).parents[1], capture_output=True, text=True, timeout=2400)
    assert out.returncode == 0, out.stderr[-3000:]
    print(out.stdout)
    records = json.loads((tmp_path / "grid" / "records.json").read_text())["records"]
    for task in {r["task"] for r in records}:
        result = significance(records, task, "dapt_tapt", "baseline", metric="macro_f1")
        assert result.significant, result

        def mean(variant):
            return np.mean([r["metrics"]["macro_f1"] for r in records if r["task"] == task and r["variant"] == variant])
        assert mean("not_dapt") <= mean("dapt")
