"""Every `taopd ...` command shown in the README and the manual parses with the real argument
parser (nothing runs), so a renamed flag breaks the build; and `taopd --version`."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from taopd.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def shown_commands() -> list[tuple[str, str]]:
    """(page, command line) for each `taopd <sub> ...` line of a bash/console code block,
    continuation lines joined."""
    out = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for block in re.findall(r"```(?:bash|console|sh)\n(.*?)```", text, flags=re.S):
            joined = re.sub(r"\\\n\s*", " ", block)
            for line in joined.splitlines():
                line = line.strip().lstrip("$ ").split(" #")[0]
                m = re.search(r"(?:^|\s|/)taopd\s+([a-z].*)$", line)
                # a synopsis ('[--steps N]') is documentation, not a command line
                if m and not line.startswith(("pip", "make")) and "[" not in m.group(1):
                    out.append((page.name, re.sub(r"\$\w+", "", m.group(1))))
    return out


COMMANDS = shown_commands()


def test_the_manual_shows_commands():
    assert len(COMMANDS) >= 15
    assert {c.split()[0] for _, c in COMMANDS} >= {"train", "compare", "diagnose", "pilot"}


@pytest.mark.parametrize("page,command", COMMANDS)
def test_every_shown_command_parses(page, command):
    argv = shlex.split(command.split("|")[0].split(">")[0].split("&&")[0])
    try:
        build_parser().parse_args(argv)
    except SystemExit as e:
        pytest.fail(f"{page}: `taopd {command}` does not parse (exit {e.code})")


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert re.fullmatch(r"taopd \d+\.\d+\.\d+\S*\n", capsys.readouterr().out)
