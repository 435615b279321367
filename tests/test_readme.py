"""The README as a user follows it: its two commands, and its walk-through run as written.

The walk-through block (the ```console block after the README's ``<!-- walk-through: ... -->``
comment) is run command by command in one shell, as a user types it in their second terminal:
in a directory where ``keyguard-server serve`` (what ``make run`` runs) left ``data/admin.token``,
with ``.venv/bin`` first on PATH (``source .venv/bin/activate``). The only difference is the
server's port: the test's server listens on a free one, which the CLI is told through
``KEYGUARD_TARGET``, the environment variable it documents for that. Each command's output must
match the lines under it, where ``…`` stands for anything (a key that differs on every run).
Also: every relative link of the README and the guides points at a file and heading that exist.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.processes import ServeProcess

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
MARKER = "<!-- walk-through:"
WILDCARD = "…"
END = "@@keyguard-readme-step-end@@"  # printed after each command, with its exit status


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of each fenced code block, in order."""
    return [(m[1], m[2]) for m in re.finditer(r"^```(\w*)\n(.*?)^```$", text, re.MULTILINE | re.DOTALL)]


def walk_through() -> list[tuple[str, list[str]]]:
    """(command, expected output lines) of each ``$ `` line of the walk-through block."""
    text = README.read_text()
    assert MARKER in text, f"README.md lost its {MARKER!r} comment"
    language, body = fenced_blocks(text[text.index(MARKER) :])[0]
    assert language == "console"
    steps: list[tuple[str, list[str]]] = []
    for line in body.splitlines():
        if line.startswith("$ "):
            steps.append((line[2:], []))
        else:
            assert steps, f"output before the first command: {line!r}"
            steps[-1][1].append(line)
    return steps


def matches(expected: str, actual: str) -> bool:
    pattern = ".+".join(re.escape(part) for part in expected.split(WILDCARD))
    return re.fullmatch(pattern, actual) is not None


def test_the_first_block_is_the_two_commands_and_ci_runs_the_test_command() -> None:
    (language, body), *_ = fenced_blocks(README.read_text())
    commands = [line.split("#")[0].strip() for line in body.splitlines()]
    assert (language, commands) == ("sh", ["make run", "make test"])
    assert re.search(r"^run: .*\n\t\$\(BIN\)/keyguard-server serve$", (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert re.search(r"^(KEYGUARD_\w+=\S+ )*make test\b", (ROOT / ".ci" / "run").read_text(), re.MULTILINE)


def test_the_walk_through_starts_the_server_with_make_run() -> None:
    text = README.read_text()
    blocks = fenced_blocks(text[text.index("## Walk-through") : text.index(MARKER)])
    assert blocks == [("console", "$ make run\n")]


def test_the_walk_through_runs_as_written(tmp_path: Path) -> None:
    steps = walk_through()
    assert [command.split()[:3] for command, _ in steps if command.startswith("keyguard keys")] == [
        ["keyguard", "keys", "create"],
        ["keyguard", "keys", "delete"],
    ]
    script = "exec 2>&1\n" + "".join(f'{command}\nprintf "\\n{END} %d\\n" "$?"\n' for command, _ in steps)
    server = ServeProcess(tmp_path)  # `keyguard-server serve` in tmp_path: data/admin.token, SQLite in data/
    try:
        env = {
            name: value
            for name, value in os.environ.items()
            if not name.startswith("KEYGUARD_")  # nothing of the test run's own settings
        }
        env |= {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"}
        env |= {"KEYGUARD_TARGET": server.target}
        done = subprocess.run(
            ["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
        )
    finally:
        server.terminate()
    chunks = done.stdout.split(f"\n{END} ")
    assert len(chunks) == len(steps) + 1, done.stdout
    texts = [chunks[0]] + [chunk.partition("\n")[2] for chunk in chunks[1:-1]]
    statuses = [int(chunk.partition("\n")[0]) for chunk in chunks[1:]]
    for (command, expected), text, status in zip(steps, texts, statuses, strict=True):
        lines = text.splitlines()
        refused = bool(expected) and expected[0].startswith("DENY: ")
        assert status == (3 if refused else 0), (command, status, lines)
        assert len(lines) == len(expected) and all(map(matches, expected, lines)), (command, expected, lines)
    assert not list(tmp_path.glob("my-bot.txt")), "the walk-through leaves the private key's file behind"


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors of a Markdown text, and explicit ``<a id=...>`` ones."""
    anchors = set(re.findall(r'<a id="([^"]+)"', markdown))
    text = re.sub(r"^```.*?^```$", "", markdown, flags=re.MULTILINE | re.DOTALL)
    for heading in re.findall(r"^#+ (.+)$", text, re.MULTILINE):
        anchors.add(re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-"))
    return anchors


@pytest.mark.parametrize(
    "page", [README, *sorted((ROOT / "docs").rglob("*.md")), ROOT / "benchmarks" / "results" / "README.md"],
    ids=lambda page: str(page.relative_to(ROOT)),
)  # fmt: skip
def test_relative_links_point_at_what_exists(page: Path) -> None:
    text = page.read_text()
    prose = re.sub(r"^```.*?^```$", "", text, flags=re.MULTILINE | re.DOTALL)
    for target in re.findall(r"\]\(([^)\s]+)\)", prose):
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto:
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        assert linked.exists(), f"{page.relative_to(ROOT)}: {target} does not exist"
        assert linked.is_relative_to(ROOT), f"{page.relative_to(ROOT)}: {target} is outside the repository"
        if anchor and linked.suffix == ".md":
            assert anchor in _anchors(linked.read_text()), f"{page.relative_to(ROOT)}: no heading for {target}"
