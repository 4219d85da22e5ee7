"""The code blocks of README.md and docs/*.md work as written.

Rules:

* Every ```python block runs on its own, in a fresh interpreter (one CPU thread) whose working
  directory is an empty temporary directory, and must exit 0 within ``PYTHON_TIMEOUT`` seconds: blocks are
  self-contained (their own imports, the shipped models, small sizes). Text that is not meant to
  run goes in a block of another language (```text, or a bare ``` for program output).
* Every line of a ```bash block is a command (``\\`` continuations joined, ``# comments`` and
  leading ``VAR=value`` assignments dropped), checked by its first word:

  - ``specdiff SUB ...``, ``python -m MODULE ...`` and ``torchrun ... -m MODULE ...``: the
    subcommand or module exists, and every ``--flag`` on the line is listed by its ``--help``
    (and its value is one of the listed choices, where the help lists them). torchrun's own flags
    are not checked.
  - In a block right after the line ``<!-- doc-test: run -->`` every such command is also run
    and must exit 0 (for cheap commands with small sizes).
  - ``python bench/SCRIPT.py ...`` and ``bash bench/SCRIPT.sh``: the script exists and mentions
    every ``--flag`` used (benchmarks take minutes; they are not run).
  - ``make``, ``pip``, ``cmake`` lines are not checked: they build or install the package, which
    ``make test`` itself and ``python_tests/test_packaging.py`` cover.
  - Any other first word fails the test, so that a new kind of command gets a rule here.
* Other blocks (program output, C++, ...) are not checked.
"""

from __future__ import annotations

import functools
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUN_MARK = "<!-- doc-test: run -->"
PYTHON_TIMEOUT = 300
COMMAND_TIMEOUT = 300
NOT_CHECKED = {"make", "pip", "cmake"}  # build or install (see the module docstring)


def _blocks():
    """(file, first line number, language, text, run-marked) of every fenced block."""
    out = []
    for path in DOCS:
        lines = path.read_text().splitlines()
        i = 0
        while i < len(lines):
            m = re.match(r"^(\s*)```(\S*)\s*$", lines[i])
            if not m:
                i += 1
                continue
            indent, lang, start = m.group(1), m.group(2), i + 1
            j = start
            while j < len(lines) and lines[j].strip() != "```":
                j += 1
            body = "\n".join(
                line[len(indent) :] if line.startswith(indent) else line for line in lines[start:j]
            )
            k = i - 1
            while k >= 0 and not lines[k].strip():
                k -= 1
            marked = k >= 0 and lines[k].strip() == RUN_MARK
            out.append((path.relative_to(ROOT).as_posix(), start, lang, body, marked))
            i = j + 1
    return out


BLOCKS = _blocks()
PYTHON_BLOCKS = [b for b in BLOCKS if b[2] == "python"]
BASH_BLOCKS = [b for b in BLOCKS if b[2] in ("bash", "sh", "shell")]


def _run(argv: list[str], timeout: float = COMMAND_TIMEOUT, cwd=None):
    """``argv`` in a subprocess in a user's environment, its text output captured."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # set by conftest for the kernel tests; a user has it unset
    env["OMP_NUM_THREADS"] = "1"  # one thread per block: robust on a loaded shared machine
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def test_the_docs_have_blocks_to_check():
    assert any(f == "README.md" for f, *_ in PYTHON_BLOCKS), "no python block found in README.md"
    assert any(f == "README.md" for f, *_ in BASH_BLOCKS), "no bash block found in README.md"


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=[f"{f}:{n}" for f, n, *_ in PYTHON_BLOCKS])
def test_python_block_runs(block, tmp_path):
    file, line, _, code, _ = block
    script = tmp_path / "block.py"
    script.write_text(code + "\n")
    res = _run([sys.executable, str(script)], PYTHON_TIMEOUT, cwd=tmp_path)
    assert res.returncode == 0, (
        f"the python block at {file}:{line} failed:\n{code}\n--- stderr:\n{res.stderr[-4000:]}"
    )


# ----------------------------------------------------------------------------- command lines
def _commands(text: str) -> list[list[str]]:
    """The block's commands as argument lists (continuations joined, comments dropped)."""
    joined = re.sub(r"\\\n", " ", text)
    cmds = []
    for line in joined.splitlines():
        argv = shlex.split(line, comments=True)
        while argv and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", argv[0]):
            argv = argv[1:]
        if argv:
            cmds.append(argv)
    return cmds


def _split(argv: list[str]):
    """(program prefix to run it with this interpreter, the arguments to check) or None when the
    line is not checked; raises AssertionError for a command no rule covers."""
    head = argv[0]
    if head in NOT_CHECKED:
        return None
    if head == "specdiff":
        assert len(argv) > 1, "specdiff needs a subcommand"
        return [sys.executable, "-m", "specdiff_kernels", argv[1]], argv[2:]
    if head in ("python", "python3") and len(argv) > 2 and argv[1] == "-m":
        return [sys.executable, "-m", argv[2]], argv[3:]
    if head == "torchrun":
        assert "-m" in argv, f"torchrun without -m MODULE: {argv}"
        i = argv.index("-m")
        return [sys.executable, "-m", argv[i + 1]], argv[i + 2 :]
    if (head in ("python", "python3") and len(argv) > 1 and argv[1].startswith("bench/")) or (
        head == "bash" and len(argv) > 1 and argv[1].startswith("bench/")
    ):
        return "bench", argv[1:]
    raise AssertionError(f"no rule for the command {shlex.join(argv)!r} (see test_docs.py)")


@functools.lru_cache(maxsize=None)
def _help(prefix: tuple) -> str:
    res = _run([*prefix, "--help"], cwd=ROOT)
    assert res.returncode == 0, f"{' '.join(prefix[2:])} --help failed:\n{res.stderr[-2000:]}"
    return res.stdout


def _flags(help_text: str) -> dict:
    """``--flag`` -> its choices (a set), "value" (takes a value) or None (takes none)."""
    flags = {}
    for m in re.finditer(
        r"(?<![\w-])(--[A-Za-z][\w-]*)(?: (\{[^}]*\}|[A-Z][A-Z0-9_|]*))?", help_text
    ):
        flag, arg = m.group(1), m.group(2)
        if arg is None:
            flags.setdefault(flag, None)
        elif arg.startswith("{"):
            flags[flag] = set(arg[1:-1].split(","))
        else:
            flags[flag] = flags.get(flag) or "value"
    return flags


def _check_flags(args: list[str], flags: dict, where: str) -> None:
    i = 0
    while i < len(args):
        tok = args[i]
        if tok.startswith("--"):
            name, _, inline = tok.partition("=")
            assert name in flags, f"{where}: {name} is not a flag of this command ({sorted(flags)})"
            spec = flags[name]
            if spec is not None and not inline:
                assert i + 1 < len(args), f"{where}: {name} needs a value"
                value = args[i + 1]
                i += 1
            else:
                value = inline or None
            if isinstance(spec, set) and value is not None:
                assert value in spec, f"{where}: {name} {value}: not one of {sorted(spec)}"
        i += 1


def _bench_check(args: list[str], where: str) -> None:
    script = ROOT / args[0]
    assert script.is_file(), f"{where}: {args[0]} does not exist"
    text = script.read_text()
    common = ROOT / "bench" / "_common.py"
    if common.is_file():
        text += common.read_text()
    for tok in args[1:]:
        if tok.startswith("--"):
            name = tok.partition("=")[0]
            assert f'"{name}"' in text or f"'{name}'" in text, f"{where}: {args[0]} has no {name}"


@pytest.mark.parametrize("block", BASH_BLOCKS, ids=[f"{f}:{n}" for f, n, *_ in BASH_BLOCKS])
def test_bash_block_commands_exist(block, tmp_path):
    file, line, _, text, marked = block
    for argv in _commands(text):
        where = f"{file}:{line}: {shlex.join(argv)}"
        split = _split(argv)
        if split is None:
            continue
        prefix, args = split
        if prefix == "bench":
            _bench_check(args, where)
            continue
        _check_flags(args, _flags(_help(tuple(prefix))), where)
        if marked:
            res = _run([*prefix, *args], cwd=tmp_path)
            assert res.returncode == 0, (
                f"{where} exited {res.returncode}:\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}"
            )


def test_the_command_checks_catch_mistakes():
    """The checker itself (no subprocess): flags, choices and values are read from a help text."""
    help_text = (
        "usage: specdiff demo [-h] [--model {digits,gmm}] [--steps STEPS] [--no-progress]\n"
        "  --steps STEPS  sampling steps (at most --window)\n"
    )
    flags = _flags(help_text)
    assert flags == {
        "--model": {"digits", "gmm"},
        "--steps": "value",
        "--no-progress": None,
        "--window": None,
    }
    _check_flags(["--model", "gmm", "--steps", "5", "--no-progress"], flags, "ok")
    for bad in (["--modle", "gmm"], ["--model", "mnist"], ["--steps"]):
        with pytest.raises(AssertionError):
            _check_flags(bad, flags, "bad")
    assert _commands("OMP_NUM_THREADS=1 specdiff demo \\\n  --steps 5  # a comment\n") == [
        ["specdiff", "demo", "--steps", "5"]
    ]
    assert _split(["make", "test"]) is None
    with pytest.raises(AssertionError):
        _split(["curl", "https://example.com"])


# ----------------------------------------------------------------------------- the demo's output
def _readme_demo_block() -> str:
    """The README's sample of what `make demo` prints: the bare block after 'make demo' samples."""
    text = (ROOT / "README.md").read_text()
    start = text.index("`make demo` samples")
    m = re.search(r"^```\s*$\n(.*?)^```\s*$", text[start:], re.S | re.M)
    return m.group(1)


def _label(line: str) -> str:
    """A line's fixed words: up to its first number (values change from run to run)."""
    return re.split(r"\s*[-+]?\d", line.strip(), maxsplit=1)[0].strip()


def test_readme_demo_block_matches_what_the_demo_prints(tmp_path):
    """Every line the README shows of `make demo` (`specdiff demo --overwrite`) is one the demo
    prints, up to its numbers (a short run: the same lines, other values)."""
    cmd = [str(Path(sys.executable).with_name("specdiff")), "demo", "--steps", "40", "--reps", "1"]
    res = _run(cmd + ["--no-progress", "--out", str(tmp_path)])
    assert res.returncode == 0, res.stderr[-2000:]
    printed = [_label(line) for line in res.stdout.splitlines()]
    shown = [line for line in _readme_demo_block().splitlines() if line.strip()]
    assert len(shown) >= 5
    for line in shown:
        assert _label(line) in printed, f"README line not printed by the demo: {line!r}"
