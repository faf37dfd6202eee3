"""Parameter-efficient methods end to end through the CLI: a grid with a methods dimension, TAPT with
adapters, early seed discarding, the adapter file, and the LoRA-merged export reloaded in transformers."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from export_check import assert_transformers_logits_match

from dontstop_jax.engine.checkpoint import Checkpointer
from dontstop_jax.model.peft import load_delta

pytestmark = pytest.mark.slow
ROOT = Path(__file__).parents[1]


def _cli(*args, ok=True):
    out = subprocess.run(
        [sys.executable, "-m", "dontstop_jax", *args], cwd=ROOT, capture_output=True, text=True, timeout=1200
    )
    assert (out.returncode == 0) == ok, out.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    root = tmp_path_factory.mktemp("peft")
    out = _cli(
        "demo",
        "--scale",
        "tiny",
        f"--config.workdir={root / 'grid'}",
        f"--config.synthetic.directory={root / 'bench'}",
        "--config.variants=['baseline','tapt']",
        "--config.methods=['full','lora']",
        "--config.method_overrides={'lora': {'optim': {'learning_rate': 2e-3}}}",
        "--config.tapt.peft.method=houlsby",
        "--config.seed_discard.fraction=0.34",
        "--config.seed_discard.keep=1",
    )
    return root, out.stdout


def test_grid_rows_per_method_with_parameter_counts_and_epoch_times(grid):
    root, stdout = grid
    assert "| baseline/lora |" in stdout and "| tapt/lora |" in stdout and "params" in stdout
    records = json.loads((root / "grid" / "records.json").read_text())["records"]
    by_label: dict[str, list] = {}
    for r in records:
        by_label.setdefault(r["variant"], []).append(r)
    assert set(by_label) == {"baseline", "baseline/lora", "tapt", "tapt/lora"}
    full, lora = by_label["baseline"][0]["extras"], by_label["baseline/lora"][0]["extras"]
    assert 0 < lora["trainable_params"] < full["trainable_params"] / 5 and lora["seconds_per_epoch"] > 0
    for label, lr in (("baseline", 1e-3), ("baseline-lora", 2e-3)):  # method_overrides reach only LoRA's runs
        ckpt = Checkpointer(
            next((root / "grid" / "finetune").glob(f"bio_topic-{label}-s0-*")) / "checkpoints", read_only=True
        )
        assert ckpt.meta(ckpt.latest_step())["config"]["optim"]["learning_rate"] == lr
    for label, runs in by_label.items():  # Dodge et al.: seed 1 stops early iff it is behind seed 0 there
        summaries = {
            r["seed"]: json.loads(
                next(
                    (root / "grid" / "finetune").glob(f"bio_topic-{label.replace('/', '-')}-s{r['seed']}-*/DONE.json")
                ).read_text()
            )
            for r in runs
        }
        assert summaries[1]["discarded"] == (summaries[1]["early_dev"] < summaries[0]["early_dev"])
        assert not summaries[0]["discarded"]
        if summaries[1]["discarded"]:
            assert summaries[1]["epochs_run"] == 2  # ceil(0.34 * 3 epochs)


def test_tapt_with_adapters_leaves_a_small_adapter_file(grid):
    root, _ = grid
    tapt = next((root / "grid" / "pretrain").glob("tapt-*"))
    ckpt = Checkpointer(tapt / "checkpoints", read_only=True)
    meta = ckpt.meta(ckpt.latest_step())
    assert meta["model_config"]["adapter"] == "houlsby"
    full = ckpt.restore_params()
    base = {
        "roberta": {
            **full["roberta"],
            "layers": {k: v for k, v in full["roberta"]["layers"].items() if "adapter" not in k},
        }
    }
    cfg, loaded = load_delta(tapt / "peft.safetensors", base)
    assert cfg.adapter == "houlsby" and (tapt / "peft.safetensors").stat().st_size < 0.5 * sum(
        v.nbytes for v in jax.tree_util.tree_leaves(full)
    )
    np.testing.assert_array_equal(
        loaded["roberta"]["layers"]["output_adapter"]["up"]["kernel"],
        full["roberta"]["layers"]["output_adapter"]["up"]["kernel"],
    )
    refused = _cli("export", "--from", str(tapt), "--to", str(root / "tapt-hf"), ok=False)
    assert "adapters" in refused.stderr and "--peft-only" in refused.stderr


def test_lora_model_exports_merged_with_the_same_logits(grid):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    root, _ = grid
    phase = next((root / "grid" / "finetune").glob("bio_topic-baseline-lora-s0-*"))
    assert (phase / "peft.safetensors").exists()
    _cli("export", "--from", str(phase), "--to", str(root / "exported"))
    assert assert_transformers_logits_match(phase, root / "exported")["model_config"]["lora_rank"] > 0
