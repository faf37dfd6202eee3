"""Shared fixtures. No hub access: every tokenizer or model used in tests is built here from scratch."""

from __future__ import annotations

import os

import pytest

TINY_TEXTS = [
    "the quick brown fox jumps over the lazy dog",
    "domain adaptive pretraining helps on biomedical papers",
    "task adaptive pretraining uses the unlabeled task data",
    "hello world, this is a tiny tokenizer for unit tests",
    "reviews of movies and products are a domain too",
]


def _bpe_tokenizer(path, vocab_size: int, byte_alphabet: bool) -> str:
    """A RoBERTa-like BPE tokenizer (<s> <pad> </s> <unk> <mask> at ids 0..4) trained on TINY_TEXTS, saved."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    from dontstop_jax.synthetic.tokenizer import wrap

    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet() if byte_alphabet else [],
        show_progress=False,
    )
    backend.train_from_iterator(TINY_TEXTS * 5, trainer)
    backend.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    wrap(backend).save_pretrained(path)
    return str(path)


# The README's test command runs the suite on every core (pytest-xdist, `-n auto --dist loadgroup`): a worker takes
# whole files, and files that read one expensive session fixture go to one worker (it is built once per worker).
SHARED_SESSION_FIXTURES = ("tiny_grid", "continual_reference")
# The longest files (CI's --durations), handed out first so that no worker is left with a long file at the end.
LONGEST_FIRST = (
    "test_multihost.py",  # with test_interrupt, test_pipeline, test_workdir_move: ~900 s on one of 2 workers
    "test_synthetic_effect.py",
    "test_grad_reduction.py",
    "test_das_continual.py",
    "test_engine.py",
    "test_gcs.py",
    "test_peft.py",
    "test_launch.py",
    "test_fuzz.py",
    "test_plan.py",
    "test_hardening_ckpt.py",
    "test_peft_pipeline.py",
)


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """`-n auto`: one worker per core, at most 4 (each holds a JAX runtime and starts multi-process runs)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cores, 4))


@pytest.hookimpl(tryfirst=True)  # before xdist names each item's group from its xdist_group mark
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Group each file's tests (with `--dist loadgroup`: one worker runs them, module fixtures are built once),
    merging the files that share a SHARED_SESSION_FIXTURES fixture; under xdist, order the groups LONGEST_FIRST."""
    group = {item.path.name: item.path.name for item in items}

    def root(name: str) -> str:
        while group[name] != name:
            name = group[name]
        return name

    for fixture in SHARED_SESSION_FIXTURES:
        users = sorted({item.path.name for item in items if fixture in getattr(item, "fixturenames", ())})
        for name in users[1:]:
            group[root(name)] = root(users[0])
    for item in items:
        item.add_marker(pytest.mark.xdist_group(root(item.path.name)))
    if hasattr(config, "workerinput"):  # an xdist worker: every worker sorts alike, so their collections agree

        def rank(item: pytest.Item) -> int:
            members = [name for name in group if root(name) == root(item.path.name)]
            return min((LONGEST_FIRST.index(n) for n in members if n in LONGEST_FIRST), default=len(LONGEST_FIRST))

        items.sort(key=rank)


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory: pytest.TempPathFactory):
    """One persistent XLA cache for the session's own programs and every CLI process of the session
    (DONTSTOP_COMPILATION_CACHE, read by runtime.setup): the tiny programs the tests share compile once per
    session, not once per test, and nothing is read from or written to the user's ~/.cache (each session starts
    as cold as a clean CI). xdist's workers share one (their base directories sit side by side)."""
    from dontstop_jax.runtime import use_compilation_cache

    base = tmp_path_factory.getbasetemp()
    path = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "xla-cache"
    path.mkdir(exist_ok=True)
    # the tests' own programs too: a program another test (or worker) compiled is read back, not compiled again
    use_compilation_cache(str(path), min_compile_secs=0)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("DONTSTOP_COMPILATION_CACHE", str(path))
        yield path


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Byte-level BPE with 400 tokens (every byte encodes)."""
    return _bpe_tokenizer(tmp_path_factory.mktemp("tiny_tokenizer"), 400, byte_alphabet=True)


@pytest.fixture(scope="session")
def small_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """At most 100 tokens (only the characters of TINY_TEXTS): fits the 128-row test models."""
    return _bpe_tokenizer(tmp_path_factory.mktemp("small_tokenizer"), 100, byte_alphabet=False)


@pytest.fixture(scope="session")
def tiny_grid(tmp_path_factory: pytest.TempPathFactory, compilation_cache):
    """The tiny demo, run once per session from an empty directory with only --config.workdir named: (root,
    stdout); the workdir is root / "grid". Shared by the pipeline tests and as the uninterrupted reference of the
    interrupt test. root / "xla" is the session's compilation cache (test_multihost passes it by that name)."""
    from tiny_pretrain import cli

    root = tmp_path_factory.mktemp("pipeline")
    (root / "cwd").mkdir()
    (root / "xla").symlink_to(compilation_cache)
    stdout = cli("demo", "--scale", "tiny", f"--config.workdir={root / 'grid'}", cwd=root / "cwd")
    return root, stdout


# The tiny DAS sequence over two domains (its importance files hand over from stage to stage), one seed, its
# stages and fine-tunes shortened (10 steps, 1 epoch): the tests compare tables, whatever they hold.
CONTINUAL_TWO_DOMAINS = [
    "continual",
    "--config",
    "configs/continual.py:tiny",
    "--config.methods=['das']",
    "--config.synthetic.domains=('bio','cs')",
    "--config.synthetic.task_domains=('bio','cs')",
    "--config.sequence=['bio','cs']",
    "--config.dapt.train.steps=10",
    "--config.finetune.train.epochs=1",
]


@pytest.fixture(scope="session")
def continual_reference(tmp_path_factory, compilation_cache) -> tuple[list[str], dict]:
    """CONTINUAL_TWO_DOMAINS run once per session, uninterrupted, by one process with 2 devices (the two hosts'
    mesh of test_multihost: the same sums): (its argv, absolute, without workdir and benchmark directory; its
    continual.json). The reference of test_interrupt's and test_multihost's continual cases."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root, repo = tmp_path_factory.mktemp("continual-reference"), Path(__file__).parents[1]
    argv = [str(repo / a) if a.startswith("configs/") else a for a in CONTINUAL_TWO_DOMAINS]
    out = subprocess.run(
        [sys.executable, "-m", "dontstop_jax", *argv, f"--config.workdir={root / 'run'}"]
        + [f"--config.synthetic.directory={root / 'benchmark'}"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=1200,
        env={**os.environ, "DONTSTOP_LOCAL_DEVICES": "2"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return argv, json.loads((root / "run" / "continual.json").read_text())
