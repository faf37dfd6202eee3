"""The Python API page's example (docs/reference/python-api.md) runs as written, on a tiny random RoBERTa: only the
model directory, the accumulation count and the export path are swapped for test-sized ones, and `batch` is given."""

import re
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

PAGE = Path(__file__).resolve().parents[1] / "docs" / "reference" / "python-api.md"


def _example() -> str:
    blocks = re.findall(r"```python\n(.*?)```", PAGE.read_text(), flags=re.S)
    assert len(blocks) == 1, f"{PAGE}: expected one python example, found {len(blocks)}"
    return blocks[0]


def test_the_python_api_example_trains_a_step_and_exports(tmp_path, tiny_tokenizer_dir):
    torch.manual_seed(0)
    hf = transformers.RobertaForMaskedLM(
        transformers.RobertaConfig(
            vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=42, type_vocab_size=1, pad_token_id=1,
        )
    )  # fmt: skip
    hf.save_pretrained(tmp_path / "roberta")
    code = _example()
    for old, new in [
        ('tokenizer_dir="/models/roberta-base"', f"tokenizer_dir={tiny_tokenizer_dir!r}"),
        ('"/models/roberta-base"', repr(str(tmp_path / "roberta"))),
        ("accum_steps=32", "accum_steps=2"),
        ('"exported/dapt"', repr(str(tmp_path / "exported"))),
    ]:
        assert old in code, f"{PAGE}: the example no longer has {old}; update this test with it"
        code = code.replace(old, new)
    rng = np.random.default_rng(0)
    ids = rng.integers(5, 97, size=(16, 16)).astype(np.int32)  # 8 batch shards x 2 micro-batches
    batch = {
        "input_ids": ids,
        "attention_mask": np.ones_like(ids),
        "mlm_positions": np.tile(np.arange(1, 4, dtype=np.int32), (16, 1)),
        "mlm_ids": ids[:, 1:4].copy(),
        "mlm_weights": np.ones((16, 3), np.float32),
    }
    scope: dict = {"batch": batch}
    exec(compile(code, str(PAGE), "exec"), scope)
    assert np.isfinite(float(scope["metrics"]["loss"]))
    assert int(scope["state"].step) == 1
    assert (tmp_path / "exported" / "config.json").exists()
