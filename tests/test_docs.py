"""Every fenced code block of README.md (and of docs/extending.md, once it exists) really runs.

All blocks of one document run in order, in one temporary working folder, so a block may use the
files an earlier one wrote. What each block language means here:

* ``toml``: when its first line is a comment naming a file (``# exp.toml``), the block is written
  to that file and loaded: a benchmark suite (a file with ``[[runs]]``) with
  :func:`sparsefl.experiment.bench.load_suite`, any other file with
  :func:`sparsefl.config.load_config`. Without a file name it must parse as TOML.
* ``bash`` / ``sh`` / ``shell``: every line that is not blank or a comment is a command (``&&``
  chains several). ``sparsefl ...`` runs the command line (``python -m sparsefl.cli.main``) and
  must exit 0; ``make TARGET ...`` is checked with ``make -n -C <repository> TARGET ...`` (running
  it would recurse into this test suite); ``python ...`` runs with this interpreter. Anything else
  fails: show it in prose instead. Error examples belong in ``console`` blocks.
* ``console``: each ``$ command`` line runs as above; the lines after it, up to the next ``$``
  line, are its expected output (stdout and stderr together, compared line by line with
  surrounding blanks stripped). It must exit 2 when that output starts with ``error:``, else 0.
* ``python``: executed in this process as a fresh module (so dataclasses and pickling work); what
  it registers (datasets, methods, ...) stays registered for the later blocks of the document and
  is removed from the registries when the document is done.
* ``text``, untagged blocks and other languages are not executed.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
DOCS = ["README.md", "docs/extending.md"]
SHELLS = {"bash", "sh", "shell"}
TIMEOUT = 180  # seconds per command; the whole README takes well under a minute
FILE_COMMENT = re.compile(r"^#\s*([\w./-]+\.toml)\s*$")


@dataclass
class Block:
    lang: str
    line: int  # 1-based line of the opening fence
    text: str


def fenced_blocks(markdown: str) -> list[Block]:
    """The fenced code blocks of ``markdown`` (backtick fences, up to 3 spaces of indent)."""
    blocks: list[Block] = []
    lines = markdown.splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"^ {0,3}(`{3,})\s*([\w+-]*)", lines[i])
        if not m:
            i += 1
            continue
        fence, lang, start = m.group(1), m.group(2).lower(), i
        body: list[str] = []
        i += 1
        while i < len(lines) and not re.match(rf"^ {{0,3}}{fence}`*\s*$", lines[i]):
            body.append(lines[i])
            i += 1
        if i == len(lines):
            raise AssertionError(f"line {start + 1}: unclosed code fence")
        blocks.append(Block(lang, start + 1, "\n".join(body) + "\n"))
        i += 1
    return blocks


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"), env.get("PYTHONPATH")) if p)
    env.setdefault("COLUMNS", "120")
    return env


def run_command(line: str, cwd: Path) -> tuple[int, str, list[str]]:
    """Run one documented command; return (exit code, stdout + stderr, the argv that ran)."""
    argv = shlex.split(line, comments=True)
    if not argv:
        return 0, "", []
    if argv[0] == "sparsefl":
        cmd = [sys.executable, "-m", "sparsefl.cli.main", *argv[1:]]
    elif argv[0] == "python":
        cmd = [sys.executable, *argv[1:]]
    elif argv[0] == "make":
        if shutil.which("make") is None:
            return 0, "", []  # nothing to check without make
        cmd = ["make", "-n", "-C", str(ROOT), *argv[1:]]
    else:
        raise AssertionError(f"{line!r}: only sparsefl, python and make commands can run in a code block")
    proc = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    return proc.returncode, proc.stdout + proc.stderr, cmd


def commands(line: str) -> list[str]:
    """The commands of one shell line (``a && b`` is two)."""
    stripped = line.strip()
    if not stripped or stripped.startswith("#"):
        return []
    return [part.strip() for part in stripped.split("&&") if part.strip()]


def run_shell_block(block: Block, cwd: Path) -> None:
    for offset, line in enumerate(block.text.splitlines(), start=1):
        for command in commands(line):
            code, out, cmd = run_command(command, cwd)
            assert code == 0, f"line {block.line + offset}: {command!r} exited {code}:\n{out[-3000:]}"


def run_console_block(block: Block, cwd: Path) -> None:
    lines = block.text.splitlines()
    steps: list[tuple[int, str, list[str]]] = []  # (line number, command, expected output)
    for offset, line in enumerate(lines, start=1):
        if line.startswith("$ "):
            steps.append((block.line + offset, line[2:], []))
        elif steps:
            steps[-1][2].append(line)
        elif line.strip():
            raise AssertionError(f"line {block.line + offset}: a console block starts with a '$ ' line")
    assert steps, f"line {block.line}: a console block without a '$ ' command"
    for lineno, command, shown in steps:
        expected = [s.strip() for s in shown]
        while expected and not expected[-1]:
            expected.pop()
        code, out, _ = run_command(command, cwd)
        want = 2 if expected and expected[0].startswith("error:") else 0
        assert code == want, f"line {lineno}: {command!r} exited {code}, expected {want}:\n{out[-3000:]}"
        got = [s.strip() for s in out.strip().splitlines()]
        assert got == expected, f"line {lineno}: {command!r} printed\n{out}\nexpected\n" + "\n".join(expected)


def run_toml_block(block: Block, cwd: Path) -> None:
    first = block.text.splitlines()[0] if block.text.strip() else ""
    m = FILE_COMMENT.match(first.strip())
    try:
        tree = tomllib.loads(block.text)
    except tomllib.TOMLDecodeError as e:
        raise AssertionError(f"line {block.line}: invalid TOML: {e}") from None
    if not m:
        return
    path = cwd / m.group(1)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(block.text)
    if "runs" in tree:
        from sparsefl.experiment.bench import load_suite

        assert load_suite(str(path)).plan(), f"line {block.line}: the suite plans no run"
    else:
        from sparsefl.config import load_config

        load_config(path)


def run_python_block(block: Block, doc: str, monkeypatch: pytest.MonkeyPatch) -> None:
    name = "docblock_" + re.sub(r"\W", "_", f"{doc}_{block.line}")
    module = types.ModuleType(name)
    module.__file__ = f"{doc}:{block.line}"
    monkeypatch.setitem(sys.modules, name, module)
    code = compile(block.text, module.__file__, "exec")
    exec(code, module.__dict__)  # noqa: S102  (the documented code, on purpose)


@contextlib.contextmanager
def registries_restored() -> Iterator[None]:
    """Undo whatever the documents register, so the rest of the test suite sees the built-ins only."""
    import sparsefl.registry as registry

    saved = [
        (d, dict(d))
        for reg in vars(registry).values()
        if isinstance(reg, registry.Registry)
        for d in vars(reg).values()
        if isinstance(d, dict)
    ]
    try:
        yield
    finally:
        for d, before in saved:
            d.clear()
            d.update(before)


@pytest.mark.parametrize("doc", DOCS)
def test_code_blocks_run(doc: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = ROOT / doc
    if not path.exists():
        pytest.skip(f"{doc} does not exist yet")
    blocks = fenced_blocks(path.read_text())
    assert blocks, f"{doc} has no code block"
    monkeypatch.chdir(tmp_path)
    with registries_restored():
        for block in blocks:
            if block.lang in SHELLS:
                run_shell_block(block, tmp_path)
            elif block.lang == "console":
                run_console_block(block, tmp_path)
            elif block.lang == "toml":
                run_toml_block(block, tmp_path)
            elif block.lang == "python":
                run_python_block(block, doc, monkeypatch)


def test_readme_is_short_and_self_contained() -> None:
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    assert "../" not in text, "the README links only inside the repository"
    for link in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if re.match(r"^[a-z]+://", link) or (link in DOCS and link != "README.md"):
            continue  # the web, or a document this test runs once it exists
        assert (ROOT / link).exists(), f"README links to a missing file: {link}"
