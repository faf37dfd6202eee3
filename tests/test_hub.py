"""Hub ids as `init`/`tokenizer`, offline: a tiny RoBERTa placed in a Hugging Face cache the way huggingface_hub
lays one out (models--org--name/{blobs,refs,snapshots}), read with HF_HUB_OFFLINE=1. Nothing is downloaded."""

import hashlib
import json
import os
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from tiny_hf import save_tiny_roberta
from tiny_pretrain import command, run, write_corpus

from dontstop_jax.errors import UserError
from dontstop_jax.model import hub
from dontstop_jax.train import source as sources

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _cache_repo(cache: Path, repo: str, files: Path) -> Path:
    """`files` as commit COMMIT of model `repo` on branch main: content-addressed blobs, snapshot symlinks."""
    root = cache / f"models--{repo.replace('/', '--')}"
    snap = root / "snapshots" / COMMIT
    (root / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in files.iterdir():
        blob = root / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, blob)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(COMMIT)
    return snap


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory, small_tokenizer_dir) -> tuple[Path, Path]:
    """(HF_HOME whose cache holds org/name, the same model as a plain directory)."""
    root = tmp_path_factory.mktemp("hub")
    model_dir = save_tiny_roberta(root / "tiny-roberta", small_tokenizer_dir, vocab_size=128)
    _cache_repo(root / "hf" / "hub", "org/name", model_dir)
    return root / "hf", model_dir


@pytest.fixture
def offline(hf_home, monkeypatch) -> Path:
    """This process reads only hf_home's cache (huggingface_hub read its env at import, so set its constants)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf_home[0] / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return hf_home[0]


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_", "HUGGINGFACE_"))}
    return {**env, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1"}


@pytest.mark.parametrize(
    "s, expected",
    [
        ("roberta-base", True),
        ("allenai/biomed_roberta_base", True),
        ("org/name@v1.0", True),
        ("org/name@refs/pr/1", True),
        ("scratch", False),
        ("/models/roberta-base", False),
        ("./roberta", False),
        ("a/b/c", False),
        ("", False),
        ("org/name@", False),
    ],
)
def test_what_looks_like_a_hub_id(s, expected):
    assert hub.looks_like_hub_id(s) is expected


def test_an_existing_directory_wins_over_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "roberta-base").mkdir()
    assert not hub.looks_like_hub_id("roberta-base")


def test_a_cached_hub_id_loads_the_same_weights_as_the_directory(offline, hf_home):
    local = sources.resolve(str(hf_home[1]))
    cached = sources.resolve("org/name")
    assert cached.parent == f"hf:org/name@{COMMIT}"
    assert cached.config == local.config
    jax.tree_util.tree_map(np.testing.assert_array_equal, cached.params, local.params)
    # The tokenizer stays the id (each host resolves it in its own cache), and the id resolves to the snapshot.
    assert cached.tokenizer_dir == "org/name"
    assert Path(hub.local("org/name")) == offline / "hub" / "models--org--name" / "snapshots" / COMMIT
    pinned = sources.resolve(f"org/name@{COMMIT}", tokenizer="org/name")
    assert pinned.parent == cached.parent and pinned.tokenizer_dir == cached.tokenizer_dir


def test_a_hub_tokenizer_loads(offline, small_tokenizer_dir):
    from dontstop_jax.data import load_tokenizer

    assert load_tokenizer("org/name").get_vocab() == load_tokenizer(small_tokenizer_dir).get_vocab()


def test_an_uncached_id_offline_is_one_line_naming_it_and_the_fix(offline):
    with pytest.raises(UserError) as err:
        sources.resolve("org/missing")
    message = str(err.value)
    assert "org/missing" in message and "hf download org/missing" in message and "HF_HUB_OFFLINE=1" in message
    assert "\n" not in message


def test_a_pretrain_phase_starts_from_a_hub_id_offline(hf_home, tmp_path):
    home, _ = hf_home
    corpus, cache = write_corpus(tmp_path), tmp_path / "cache"
    cmd = command(tmp_path / "w", corpus, "org/name", cache, steps=2, extra={"init": "org/name", "checkpoint.every": 2})
    out = run(cmd, env=_env(home))
    assert out.returncode == 0, out.stderr[-3000:]
    done = json.loads((tmp_path / "w" / "DONE.json").read_text())
    assert done["parent"] == f"hf:org/name@{COMMIT}"


def test_the_cli_names_an_uncached_id_in_one_line(hf_home, tmp_path):
    out = run(
        command(
            tmp_path / "w",
            tmp_path / "none.txt",
            str(hf_home[1]),
            tmp_path / "cache",
            steps=2,
            extra={"init": "org/missing"},
        ),
        env=_env(hf_home[0]),
    )
    assert out.returncode == 2, out.stderr[-3000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "org/missing" in lines[0] and "hf download org/missing" in lines[0], lines
