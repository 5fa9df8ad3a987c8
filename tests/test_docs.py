"""Every code block of the docs (README.md and docs/*.md) is run or checked here.

The convention (the README's "About these docs" says it too):

- A ```python block is a complete script. It runs with this interpreter in an empty
  temporary directory, the project root on ``PYTHONPATH`` (so ``examples.*`` imports), and
  must exit 0 within a minute. Blocks check what they claim with ``assert``.
- A marker on the line before a block changes that:

  - ``<!-- docs-test: pytest -->``: the block is a test module; pytest runs it, it must pass;
  - ``<!-- docs-test: first-mail -->``: the block runs while ``minismtp run --port 0`` (the
    embedded default) serves in the same directory, with that port in place of ``2525``;
    afterwards exactly one message, with our ``Received:`` header, is in ``./maildir/new``;
  - ``<!-- docs-test: excerpt PATH -->``: the block is copied verbatim from the file at PATH
    (an example that tests/test_examples.py runs);
  - ``<!-- docs-test: cli-help -->``: the block is exactly what ``minismtp run --help``
    prints (``COLUMNS=100``).

- Blocks in other languages (``console``, ``ini``, ``text``...) are not run, but every
  ``minismtp run ...`` command line in them is parsed by the command's own option parser,
  so the docs name only options that exist. The two set-up commands appear exactly once.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
import subprocess
import sys
from pathlib import Path

import attrs
import pytest

from minismtp.cli import build_parser
from tests.helpers.processes import ROOT, project_env
from tests.helpers.processes import run as minismtp_run

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SETUP_SERVER = (
    "python3 -m venv .venv && . .venv/bin/activate && pip install -e . && minismtp run --port 2525"
)
SETUP_TESTS = (
    "python3 -m venv .venv && . .venv/bin/activate && "
    "pip install -e '.[test]' -c .ci/constraints.txt && python -m pytest"
)
MARKERS = ("pytest", "first-mail", "excerpt", "cli-help")
_FENCE = re.compile(r"^```([\w+-]*)\s*$")
_MARKER = re.compile(r"^<!-- docs-test: ([\w-]+)(?: (\S+))? -->$")
_COMMAND = re.compile(r"\bminismtp run\b(.*)")
TIMEOUT = 60


@attrs.frozen
class Block:
    path: Path
    line: int  # of the opening fence, counting from 1
    language: str
    code: str
    marker: str | None = None
    argument: str | None = None

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def read_blocks(path: Path) -> list[Block]:
    """The fenced code blocks of a Markdown file, with the marker before each, if any."""
    blocks: list[Block] = []
    lines = path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        fence = _FENCE.match(lines[i])
        if fence is None:
            i += 1
            continue
        start = i
        i += 1
        while i < len(lines) and lines[i].rstrip() != "```":
            i += 1
        if i == len(lines):
            raise AssertionError(f"{path.name}:{start + 1}: code block never closed")
        previous = next((line for line in reversed(lines[:start]) if line.strip()), "")
        marker = _MARKER.match(previous.strip())
        code = "\n".join(lines[start + 1 : i]) + "\n"
        blocks.append(
            Block(
                path,
                start + 1,
                fence[1],
                code,
                marker[1] if marker else None,
                marker[2] if marker else None,
            )
        )
        i += 1
    return blocks


BLOCKS = [block for path in DOCS for block in read_blocks(path)]
PYTHON = [b for b in BLOCKS if b.language == "python" and b.marker != "excerpt"]
EXCERPTS = [b for b in BLOCKS if b.marker == "excerpt"]
OTHERS = [b for b in BLOCKS if b.language != "python" and b.marker != "cli-help"]


def run(args: list[str], cwd: Path, timeout: float = TIMEOUT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, cwd=cwd, env=project_env(), capture_output=True, text=True, timeout=timeout
    )


def output(result: subprocess.CompletedProcess[str]) -> str:
    return f"exit {result.returncode}\n--- stdout\n{result.stdout}--- stderr\n{result.stderr}"


# -- the blocks ------------------------------------------------------------------------------


def test_docs_have_the_blocks_this_file_expects() -> None:
    assert (ROOT / "README.md") in DOCS
    assert len(PYTHON) >= 8, [b.where for b in PYTHON]
    for block in BLOCKS:
        assert block.marker is None or block.marker in MARKERS, f"{block.where}: unknown marker"
        assert block.language, f"{block.where}: say the block's language"
    assert [b.marker for b in BLOCKS].count("cli-help") == 1
    assert [b.marker for b in BLOCKS].count("first-mail") == 1


@pytest.mark.parametrize("block", PYTHON, ids=[b.where for b in PYTHON])
def test_python_block_runs(block: Block, tmp_path: Path) -> None:
    if block.marker == "pytest":
        (tmp_path / "test_docs_block.py").write_text(block.code)
        result = run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_docs_block.py"],
            tmp_path,
        )
        assert result.returncode == 0, output(result)
        assert re.search(r"\b[1-9]\d* passed\b", result.stdout), output(result)
    elif block.marker == "first-mail":
        assert "2525" in block.code
        with minismtp_run(cwd=tmp_path) as server:
            script = tmp_path / "docs_block.py"
            script.write_text(block.code.replace("2525", str(server.port)))
            result = run([sys.executable, script.name], tmp_path)
        assert result.returncode == 0, output(result)
        assert server.returncode == 0, server.output
        (stored,) = (tmp_path / "maildir" / "new").iterdir()
        assert stored.read_bytes().startswith(b"Received: from ")
        # The log line the README shows for this message gives the size the server logs.
        readme = (ROOT / "README.md").read_text(encoding="utf-8")
        shown = re.search(r"INFO minismtp\.server: session .* size=(\d+) reply=250 ", readme)
        logged = re.search(
            r"INFO minismtp\.server: session .* size=(\d+) reply=250 ", server.output
        )
        assert shown is not None and logged is not None, server.output
        assert shown[1] == logged[1], "the README's first-mail log line shows another size"
    else:
        assert block.marker is None, f"{block.where}: marker {block.marker} is not for python"
        (tmp_path / "docs_block.py").write_text(block.code)
        result = run([sys.executable, "docs_block.py"], tmp_path)
        assert result.returncode == 0, output(result)


@pytest.mark.parametrize("block", EXCERPTS, ids=[b.where for b in EXCERPTS])
def test_excerpt_is_verbatim_from_its_file(block: Block) -> None:
    assert block.argument, f"{block.where}: excerpt of which file?"
    source = (ROOT / block.argument).read_text(encoding="utf-8")
    assert block.code in source, f"{block.where} differs from {block.argument}"


def test_cli_reference_is_minismtp_run_help(tmp_path: Path) -> None:
    (block,) = [b for b in BLOCKS if b.marker == "cli-help"]
    result = subprocess.run(
        [sys.executable, "-m", "minismtp", "run", "--help"],
        cwd=tmp_path,
        env=project_env(COLUMNS="100"),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert result.returncode == 0, output(result)
    # Python 3.10's argparse titles the options section "optional arguments".
    printed = result.stdout.replace("\noptional arguments:\n", "\noptions:\n")
    assert block.code == printed, (
        f"{block.where}: paste the output of `COLUMNS=100 minismtp run --help` into the block"
    )


def command_lines(block: Block) -> list[str]:
    """The ``minismtp run`` commands of a shell or config block, continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", block.code)
    return [match[1] for match in map(_COMMAND.search, text.splitlines()) if match]


@pytest.mark.parametrize("block", OTHERS, ids=[b.where for b in OTHERS])
def test_minismtp_run_commands_in_blocks_parse(block: Block) -> None:
    for arguments in command_lines(block):
        words = shlex.split(arguments, comments=True)
        for end, word in enumerate(words):
            if word in ("&&", "||", "|", "&", ";"):
                words = words[:end]
                break
        errors = io.StringIO()
        try:
            with contextlib.redirect_stderr(errors), contextlib.redirect_stdout(io.StringIO()):
                build_parser().parse_args(["run", *words])
        except SystemExit as exc:
            assert exc.code == 0, f"{block.where}: minismtp run {arguments}: {errors.getvalue()}"


def test_the_two_set_up_commands_appear_once_each() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert readme.count(SETUP_SERVER) == 1
    assert readme.count(SETUP_TESTS) == 1


def test_ci_runs_what_the_readme_says() -> None:
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    for step in SETUP_TESTS.split(" && "):
        # CI starts from an empty environment every time, whatever the last run left.
        fresh = step.replace("-m venv .venv", "-m venv --clear .venv")
        assert step in ci or fresh in ci, f".ci/run does not run {step!r}"
    assert (ROOT / ".ci" / "constraints.txt").is_file()
