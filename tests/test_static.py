"""pyflakes over the package, configs, benchmarks and tests: an undefined name in a rarely run branch (a
multi-process path, an error message) must fail here, not in a user's run. Unused imports count too, except
the re-exports of `__init__.py` files and lines marked `# noqa`."""

import ast
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


# The package's layers, lowest first: a module imports from its own layer and those below it, never above, so
# a phase recipe can be replaced without touching the layers under it and loading a config pulls in no model.
LAYERS = [
    {"errors"},
    {"files"},
    {"distributed"},
    {"fields", "config_loader", "explain"},
    {"model"},
    {"data", "synthetic"},
    {"engine"},
    {"train"},
    {"selection", "das", "analysis"},
    {"phases"},
    {"runtime", "cli", "__main__", "docs_gen"},
]


def _imports(path: Path):
    """(line, imported module, imported names) of every import in `path`, inside functions too."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, alias.name, []) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.lineno, node.module, [alias.name for alias in node.names]


def _unit(module: str) -> str:
    """The top-level module or package of the package that `module` names ("" outside the package)."""
    return module.split(".")[1] if module.startswith("dontstop_jax.") else ""


def test_every_import_keeps_the_layer_order():
    layer = {unit: i for i, units in enumerate(LAYERS) for unit in units}
    package = ROOT / "dontstop_jax"
    units = {
        p.name.removesuffix(".py")
        for p in package.iterdir()
        if p.suffix == ".py" or (p / "__init__.py").exists() or (p.is_dir() and any(p.glob("*.py")))
    } - {"__init__"}
    assert units == set(layer), f"place every module in LAYERS: {sorted(units ^ set(layer))}"
    offenders = []
    for path in package.rglob("*.py"):
        here = path.relative_to(package).parts[0].removesuffix(".py")
        if here == "__init__":
            continue
        for line, module, names in _imports(path):
            targets = [_unit(module)] if module != "dontstop_jax" else names
            offenders += [
                f"{path.relative_to(ROOT)}:{line} ({here}, layer {layer[here]}) imports {t} (layer {layer[t]})"
                for t in targets
                if t and layer[t] > layer[here]
            ]
    assert not offenders, "\n".join(offenders)


def test_no_module_imports_another_modules_private_name():
    offenders = [
        f"{path.relative_to(ROOT)}:{line} imports {name} from {module}"
        for path in (ROOT / "dontstop_jax").rglob("*.py")
        for line, module, names in _imports(path)
        for name in names
        if name.startswith("_") and module != "__future__"
    ]
    assert not offenders, "\n".join(offenders)


def test_no_transformers_banner_without_pytorch():
    """A plain install has no PyTorch: loading a tokenizer (and everything a phase imports) prints nothing."""
    import os
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import dontstop_jax.cli, dontstop_jax.phases.grid, dontstop_jax.data.tokenizer\n"
        "import transformers; assert not transformers.is_torch_available()\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "PyTorch was not found" not in out.stderr and out.stderr.strip() == "", out.stderr


def test_files_sharing_a_session_fixture_run_on_one_xdist_worker():
    """conftest.py groups the files that share an expensive session fixture (and each file, for its module
    fixtures) into one xdist group. xdist reads the groups in its own collection hook: a grouping hook that ran
    after it left every test a group of its own, and the shared fixtures were built on every worker (CI paid
    ~350 s for it). Under `--dist loadgroup` every test's id carries its group."""
    import re
    import subprocess
    import sys

    files = ["tests/test_pipeline.py", "tests/test_workdir_move.py"]  # both read the session's tiny_grid
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-n", "2", "-v", "--setup-plan", "-p", "no:cacheprovider", *files],
        cwd=Path(__file__).parents[1],
        capture_output=True,
        text=True,
        timeout=300,
    )
    ids = re.findall(r"^(tests/test_\w+\.py::\S+)", out.stdout, re.MULTILINE)
    assert len(ids) >= 5, out.stdout[-3000:]
    assert all(i.endswith("@test_pipeline.py") for i in ids), ids
