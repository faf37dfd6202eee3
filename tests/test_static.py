"""pyflakes over the package, configs, benchmarks and tests: an undefined name in a rarely run branch (a
multi-process path, an error message) must fail here, not in a user's run. Unused imports count too, except
the re-exports of `__init__.py` files and lines marked `# noqa`."""

from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


def test_no_undefined_names_or_unused_imports():
    pyflakes_api = pytest.importorskip("pyflakes.api")
    from pyflakes import messages
    from pyflakes.reporter import Reporter

    class Collect(Reporter):
        def __init__(self):
            self.found = []

        def flake(self, message):
            self.found.append(message)

        def syntaxError(self, filename, msg, lineno, offset, text):
            self.found.append(f"{filename}:{lineno}: syntax error: {msg}")

        def unexpectedError(self, filename, msg):
            self.found.append(f"{filename}: {msg}")

    def allowed(message) -> bool:
        if not isinstance(message, messages.UnusedImport):
            return False
        path = Path(message.filename)
        return path.name == "__init__.py" or "noqa" in path.read_text().splitlines()[message.lineno - 1]

    reporter = Collect()
    for folder in ("dontstop_jax", "configs", "bench", "tests"):
        pyflakes_api.checkRecursive([str(ROOT / folder)], reporter)
    problems = [str(m) for m in reporter.found if isinstance(m, str) or not allowed(m)]
    assert not problems, "\n".join(problems)


def test_layers_below_phases_never_import_phases():
    """phases/ are recipes over the layers below; analysis and selection use the Trainer layer (train/), never a
    phase, so a research fork can replace a recipe without touching them."""
    import ast

    below = [p for folder in ("analysis", "selection", "engine", "model", "data", "train", "das", "synthetic")
             for p in (ROOT / "dontstop_jax" / folder).rglob("*.py")]
    offenders = []
    for path in below:
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            offenders += [f"{path.relative_to(ROOT)}:{node.lineno} imports {n}" for n in names
                          if n == "dontstop_jax.phases" or n.startswith("dontstop_jax.phases.")]
    assert len(below) > 30 and not offenders, "\n".join(offenders)


def test_no_transformers_banner_without_pytorch():
    """A plain install has no PyTorch: loading a tokenizer (and everything a phase imports) prints nothing."""
    import os
    import subprocess
    import sys
    code = ("import sys; sys.modules['torch'] = None\n"
            "import dontstop_jax.cli, dontstop_jax.phases.grid, dontstop_jax.data.tokenizer\n"
            "import transformers; assert not transformers.is_torch_available()\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "PyTorch was not found" not in out.stderr and out.stderr.strip() == "", out.stderr
