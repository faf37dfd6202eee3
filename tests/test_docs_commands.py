"""Every shell command in README.md and docs/ is checked against the code, so that the docs cannot drift from
it: a `dontstop` command must parse with the real argument parser and its config, with every
`--config.a.b=value`, must load and pass the loader's checks (cheap; nothing is trained), `dontstop config`
and `--help` really run, `launch/run.sh` runs with `--dry-run`, a bench script or module must exist and know
the flags given, and a repository file named (configs/..., bench/...) must exist. A `dontstop ...` code span in
the prose must name a real command, its real options and declared `--config.` fields. Data paths (/data/...,
runs/..., gs://...) are placeholders: only their existence goes unchecked. The generated reference pages must
be what `python -m dontstop_jax.docs_gen` writes now.

Commands come from fenced bash/sh/shell blocks (every line), console blocks and plain fences (`$ ` lines) and
indented code blocks that start with a command; `\\` continues a line, `#` starts a comment, `&&`, `||`, `;`
and `|` separate commands, `NAME=value` sets a variable later `$NAME`s expand to, `sbatch --wrap "..."` holds a
command, and a standalone `...` elides what the previous command of the same kind in the page said (its
`--config FILE:ARG`, or its launcher options)."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import re
import shlex
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from dontstop_jax import cli, docs_gen, fields
from dontstop_jax.errors import UserError

ROOT = Path(__file__).parents[1]
SHELL, CONSOLE = ("bash", "sh", "shell"), ("console", "")
FENCE = re.compile(r"^(\s*)(```+|~~~+)\s*([\w-]*)")
STARTS = ("dontstop", "python -m dontstop_jax", "launch/run.sh", "bash bench/", "python -m bench", "python bench/")
REPO_FILE = re.compile(r"(?<![\w/.-])(?:configs|bench|launch|tests|dontstop_jax|docs)/[\w./*-]*\w")
SEPARATORS = {"&&", "||", ";", "|", "&"}


@dataclasses.dataclass(frozen=True)
class Command:
    where: str  # file:line
    kind: str  # dontstop, launch, script (a bench or package module), inline (a code span of the prose)
    argv: tuple[str, ...]  # after the program (a script's: its path first)
    error: str = ""  # why the command could not be read

    def __str__(self) -> str:
        return f"{self.where}: {self.kind} {shlex.join(self.argv)}"


def page_lines(text: str) -> Iterator[tuple[bool, int, str]]:
    """(whether it is a shell line, line number, line) of a Markdown page's shell lines and prose lines (code
    blocks that are neither are left out)."""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        if fence := FENCE.match(lines[i]):
            indent, mark, lang = fence.groups()
            start, i = i, i + 1
            while i < len(lines) and not lines[i].strip().startswith(mark):
                i += 1
            body = [(n + 1, line[len(indent) :]) for n, line in enumerate(lines[start + 1 : i], start + 1)]
            if lang in SHELL:
                yield from ((True, n, line) for n, line in body)
            elif lang in CONSOLE:  # `$ ` lines and their continuations; the rest is output
                going = False
                for n, line in body:
                    if going or line.startswith("$ "):
                        yield True, n, line.removeprefix("$ ")
                        going = line.endswith("\\")
        elif lines[i].startswith("    ") and (i == 0 or not lines[i - 1].strip()):
            start = i
            while i < len(lines) and (lines[i].startswith("    ") or not lines[i].strip()):
                i += 1
            shell = lines[start].strip().startswith(STARTS)
            yield from ((shell, n + 1, lines[n][4:] if shell else lines[n]) for n in range(start, i))
            continue
        else:
            yield False, i + 1, lines[i]
        i += 1


def shell_lines(text: str) -> Iterator[tuple[int, str]]:
    return ((n, line) for shell, n, line in page_lines(text) if shell)


def inline_commands(text: str) -> Iterator[tuple[int, str]]:
    """(line number, text) of every `dontstop ...` code span in the prose (spans may wrap within a paragraph)."""
    prose = [(n, line) for shell, n, line in page_lines(text) if not shell]
    paragraph: list[tuple[int, str]] = []
    for n, line in [*prose, (0, "")]:
        if line.strip():
            paragraph.append((n, line))
            continue
        joined = "\n".join(line for _, line in paragraph)
        for span in re.finditer(r"`(dontstop [^`]+)`", joined):
            yield paragraph[joined.count("\n", 0, span.start())][0], " ".join(span[1].split())
        paragraph = []


def logical_lines(lines: Iterator[tuple[int, str]]) -> Iterator[tuple[int, str]]:
    """Lines joined at their `\\` continuations, numbered by their first line."""
    start = 0
    parts: list[str] = []
    for n, line in lines:
        start = start if parts else n
        if line.endswith("\\"):
            parts.append(line[:-1])
            continue
        yield start, "".join([*parts, line])
        parts = []
    if parts:
        yield start, "".join(parts)


def split_commands(line: str) -> list[list[str]]:
    """The words of each simple command of a shell line (redirections dropped)."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    words = iter(lexer)
    for word in words:
        if word in SEPARATORS:
            commands.append([])
        elif set(word) <= set("<>&") or re.fullmatch(r"\d?>+&?\d*", word):
            next(words, None)  # the redirection's target
        else:
            commands[-1].append(word)
    return [c for c in commands if c]


def classify(words: list[str]) -> tuple[str, list[str]] | None:
    """(kind, arguments) of a command the docs test checks, or None (cp, pip, pytest, ...)."""
    head = words[0]
    if head == "dontstop":
        return "dontstop", words[1:]
    if head in ("python", "python3") and len(words) > 2 and words[1] == "-m":
        module = words[2]
        if module == "dontstop_jax":
            return "dontstop", words[3:]
        if module.startswith(("dontstop_jax.", "bench.")):
            path = module.replace(".", "/")
            return "script", [path + ".py" if (ROOT / f"{path}.py").exists() else f"{path}/__init__.py", *words[3:]]
        return None
    if head in ("python", "python3", "bash") and len(words) > 1 and words[1].startswith("bench/"):
        return "script", words[1:]
    if head.startswith("bench/"):
        return "script", words
    if head == "launch/run.sh":
        return "launch", words[1:]
    return None


def _launcher_split(args: list[str]) -> tuple[list[str], list[str]]:
    """(MODE and launcher options, the dontstop command) of launch/run.sh's arguments: the first argument that
    is not a launcher option starts the command (run.sh's rule)."""
    i = 1
    while i < len(args) and (args[i].startswith("-") or args[i] == "..."):
        if args[i] == "--":
            return args[:i], args[i + 1 :]
        i += 1 if args[i] in ("--dry-run", "-h", "--help", "...") else 2
    return args[:i], args[i:]


def page_commands(text: str, where: str) -> Iterator[Command]:
    """The checked commands of the page `where`, in order, with `$VAR`s expanded and `...` elisions resolved."""
    variables: dict[str, str] = {}
    last: dict[tuple[str, str], list[str]] = {}  # what a `...` stands for, by (kind, command or mode)

    def expand(line: str) -> str:
        return re.sub(r"\$\{?(\w+)\}?", lambda m: variables.get(m[1], m[0]), line)

    def resolve(n: int, kind: str, args: list[str]) -> Command:
        if kind == "script":
            return Command(f"{where}:{n}", kind, tuple(args))
        if kind == "launch":
            launcher, inner = _launcher_split(args)
            key = ("launch", launcher[0] if launcher else "")
            if "..." in launcher:
                if key not in last:
                    return Command(f"{where}:{n}", kind, tuple(args), "`...` but no earlier command of its mode")
                launcher = [*launcher[:1], *last[key], *(a for a in launcher[1:] if a != "...")]
            last[key] = launcher[1:]
            inner_cmd = resolve(n, "dontstop", inner) if inner else None
            if inner_cmd and inner_cmd.error:
                return inner_cmd
            return Command(f"{where}:{n}", kind, (*launcher, *(inner_cmd.argv if inner_cmd else ())))
        key = ("dontstop", args[0] if args else "")
        if "..." in args:
            rest = [a for a in args if a != "..."]
            if "--config" not in rest:
                if key not in last:
                    return Command(f"{where}:{n}", kind, tuple(args), "`...` but no earlier --config for it")
                rest[1:1] = last[key]
            args = rest
        if "--config" in args:
            last[key] = args[args.index("--config") : args.index("--config") + 2]
        return Command(f"{where}:{n}", kind, tuple(args))

    for n, line in logical_lines(shell_lines(text)):
        try:
            commands = split_commands(expand(line))
        except ValueError as err:  # unbalanced quotes
            yield Command(f"{where}:{n}", "shell", (line,), f"not a shell line: {err}")
            continue
        for words in commands:
            if len(words) == 1 and (assign := re.fullmatch(r"(\w+)=(.*)", words[0])):
                variables[assign[1]] = assign[2]
            elif words[0] == "sbatch" and "--wrap" in words[:-1]:
                for inner in split_commands(words[words.index("--wrap") + 1]):
                    if found := classify(inner):
                        yield resolve(n, *found)
            elif found := classify(words):
                yield resolve(n, *found)


def inline_flags(where: str, text: str) -> Iterator[Command]:
    """The `dontstop` commands of a code span in the prose: only their flags are checked (a span often elides
    the rest, or names a placeholder: `dontstop COMMAND --help`)."""
    try:
        commands = split_commands(text)
    except ValueError:  # unbalanced quotes
        commands = [text.split()]
    yield from (Command(where, "inline", tuple(words[1:])) for words in commands if words[0] == "dontstop")


DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
COMMANDS = [
    *(c for page in DOCS for c in page_commands(page.read_text(), str(page.relative_to(ROOT)))),
    *(
        command
        for page in DOCS
        for n, text in inline_commands(page.read_text())
        for command in inline_flags(f"{page.relative_to(ROOT)}:{n}", text)
    ),
]


def missing_files(args: list[str]) -> str:
    """Every repository file an argument names (configs/x.py:arg, bench/y.py, inside overrides too) exists."""
    missing = [
        name
        for arg in args
        for name in REPO_FILE.findall(arg)
        if not any(ROOT.glob(name)) and not (ROOT / name).exists()
    ]
    return f"no such file in the repository: {', '.join(missing)}" if missing else ""


def run_main(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int | str | None, str]:
    """(exit code, stdout) of `dontstop ARGS` run in this process."""
    capsys.readouterr()
    try:
        code: int | str | None = cli.main(args)
    except SystemExit as done:  # --help
        code = done.code
    return code, capsys.readouterr().out


def dontstop_problem(args: list[str], capsys: pytest.CaptureFixture) -> str:
    """Parsed by the real parser, its config loaded and checked as the command would before any work; `config`
    and `--help` run."""
    if "-h" in args or "--help" in args:
        code, out = run_main(args, capsys)
        return "" if code == 0 and "usage:" in out else f"--help fails (exit {code})"
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            parsed, overrides = cli.parser().parse_known_args(args)
    except SystemExit:
        return f"the parser refuses it: {err.getvalue().strip().splitlines()[-1]}"
    try:
        cli.checked_config(parsed, overrides)
    except UserError as refused:
        return f"its config does not load: {refused}"
    if parsed.command == "config" and run_main(args, capsys)[0] != 0:
        return "`dontstop config` fails"
    return ""


def launch_problem(args: list[str], capsys: pytest.CaptureFixture) -> str:
    """launch/run.sh accepts its mode and options (run with --dry-run: it prints what it would start)."""
    launcher, inner = _launcher_split(args)
    dry = [*launcher[:1], "--dry-run", *launcher[1:]] if launcher and not launcher[0].startswith("-") else launcher
    out = subprocess.run(["bash", "launch/run.sh", *dry, *inner], cwd=ROOT, capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        return f"launch/run.sh refuses it: {out.stderr.strip()}"
    return dontstop_problem(inner, capsys) if inner else ""


def script_problem(args: list[str]) -> str:
    """The script or module exists and each --flag given appears in it (or, for a shell wrapper, in the module
    of the same name it passes its arguments to)."""
    script = ROOT / args[0]
    if not script.is_file():
        return f"no such script or module: {args[0]}"
    sources = [p.read_text() for p in (script, script.with_suffix(".py")) if p.is_file()]
    unknown = [
        flag
        for flag in (a.split("=")[0] for a in args[1:] if a.startswith("--"))
        if not any(re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", s) for s in sources)
    ]
    return f"{args[0]} knows no {', '.join(unknown)}" if unknown else ""


def inline_problem(args: list[str]) -> str:
    """The command exists, each of its flags is one of its options, each --config.PATH a declared field."""
    commands, _ = docs_gen.subcommands(cli.parser())
    placeholder = bool(args) and args[0].isupper()  # dontstop COMMAND --help: any command's options
    if not args or not (args[0] in commands or placeholder):
        return f"no command {args[0] if args else ''!r}; commands: {', '.join(commands)}"
    named = commands.values() if placeholder else [commands[args[0]]]
    options = {o for sub in named for a in sub._actions for o in a.option_strings}
    flags = [a.split("=")[0] for a in args[1:] if a.startswith("--")]
    unknown = [f for f in flags if not f.startswith("--config.") and f not in options]
    undeclared = [f for f in flags if f.startswith("--config.") and fields.declared(f[9:]) is None]
    return "; ".join(
        [
            *([f"dontstop {args[0]} has no option {', '.join(unknown)}"] if unknown else []),
            *([f"no such config field: {', '.join(undeclared)}"] if undeclared else []),
        ]
    )


def problem(command: Command, capsys: pytest.CaptureFixture) -> str:
    args = list(command.argv)
    if command.error or missing_files(args):
        return command.error or missing_files(args)
    if command.kind == "dontstop":
        return dontstop_problem(args, capsys)
    if command.kind == "launch":
        return launch_problem(args, capsys)
    return inline_problem(args) if command.kind == "inline" else script_problem(args)


@pytest.mark.parametrize("command", COMMANDS, ids=[f"{c.where}:{' '.join(c.argv[:2])}" for c in COMMANDS])
def test_documented_command(command: Command, capsys):
    """A failure names the page and line of the command and what is wrong with it."""
    found = problem(command, capsys)
    assert not found, f"{command.where}: {found}\n    in: {command}"


def test_the_docs_hold_commands_of_every_kind():
    """The extraction found the docs' commands (a broken extractor would otherwise check nothing)."""
    assert {c.kind for c in COMMANDS} >= {"dontstop", "launch", "inline"}
    assert {c.argv[0] for c in COMMANDS if c.kind == "dontstop"} >= {"pretrain", "finetune", "demo", "grid"}


def test_the_extraction_reads_shell_as_the_shell_does():
    text = "\n".join(
        [
            "Prose: `dontstop demo --scale` inline (only its flags are checked) and `dontstop export --from X",
            "--peft-only`, a span that wraps.",
            "",
            "```bash",
            "# a comment line",
            "B=gs://my-bucket",
            "dontstop pretrain --config configs/dapt.py:biomed \\",
            "    --config.init=$B/models/x --config.data.sources='[\"/data/*.txt\"]'  # trailing comment",
            "dontstop pretrain ... --config.seed=1 && dontstop demo --scale tiny > log.txt",
            "cp -r runs/a runs/b",
            'sbatch --nodes=2 --wrap "launch/run.sh slurm pretrain --config configs/dapt.py:biomed"',
            "```",
            "",
            "  ```",
            "  $ dontstop config --config configs/finetune.py:chemprot --diff",
            "  name   output, not a command",
            "  ```",
            "",
            "    dontstop plan --config configs/dapt.py:biomed --topology v4-8",
            "",
            "    an indented block that starts with prose is not one",
        ]
    )
    found = [(c.where, c.kind, list(c.argv)) for c in page_commands(text, "page.md")]
    assert list(inline_commands(text)) == [(1, "dontstop demo --scale"), (1, "dontstop export --from X --peft-only")]
    spans = inline_flags("p:1", "dontstop demo && dontstop analyze --config X | tee y")
    assert [c.argv for c in spans] == [("demo",), ("analyze", "--config", "X")]
    biomed = ["--config", "configs/dapt.py:biomed"]
    assert found == [
        (
            "page.md:7",
            "dontstop",
            ["pretrain", *biomed, "--config.init=gs://my-bucket/models/x", '--config.data.sources=["/data/*.txt"]'],
        ),
        ("page.md:9", "dontstop", ["pretrain", *biomed, "--config.seed=1"]),
        ("page.md:9", "dontstop", ["demo", "--scale", "tiny"]),
        ("page.md:11", "launch", ["slurm", "pretrain", *biomed]),
        ("page.md:15", "dontstop", ["config", "--config", "configs/finetune.py:chemprot", "--diff"]),
        ("page.md:19", "dontstop", ["plan", *biomed, "--topology", "v4-8"]),
    ]


def test_the_generated_reference_pages_are_current():
    stale = docs_gen.stale(ROOT)
    assert not stale, f"{', '.join(stale)} stale: run `{docs_gen.COMMAND}` and commit the pages"
