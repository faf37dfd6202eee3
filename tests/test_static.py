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
