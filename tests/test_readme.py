"""README.md against the code: every `clipft` command line in a code block parses with the real parser,
every option in the Commands table exists, and every command the parser has is in that table. The
commands are read from `build_parser()` when the test runs, so new commands are covered as they come."""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest

from clipft.cli.commands import _split_extra, build_parser
from clipft.config import ConfigError

README = Path(__file__).resolve().parents[1] / "README.md"


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _code_lines(text: str) -> list[str]:
    """Shell lines of the README's fenced code blocks, backslash continuations joined."""
    lines, in_block, pending = [], False, ""
    for raw in text.splitlines():
        if raw.lstrip().startswith("```"):
            in_block, pending = not in_block, ""
            continue
        if not in_block:
            continue
        line = pending + raw.strip()
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        lines.append(line)
    return lines


def _clipft_argvs(line: str) -> list[list[str]]:
    """The argv after `clipft` / `-m clipft` of every command on a shell line (split at ;, &&, |)."""
    try:
        words = shlex.split(line, comments=True)
    except ValueError:  # not shell (a YAML or Python line with an odd quote)
        return []
    out, cmd = [], []
    for w in words + [";"]:
        if w in (";", "&&", "||", "|", "&"):  # & ends a background command
            for i, x in enumerate(cmd):
                if (x == "clipft" and i == 0) or (x == "clipft" and i > 0 and cmd[i - 1] == "-m"):
                    out.append(cmd[i + 1:])
                    break
            cmd = []
        else:
            cmd.append(w)
    return out


def readme_command_lines() -> list[list[str]]:
    return [argv for line in _code_lines(README.read_text()) for argv in _clipft_argvs(line)]


def commands_table() -> list[str]:
    """The backticked command of each row of the README's Commands table."""
    text = README.read_text()
    section = text.split("\n## Commands\n", 1)[1].split("\n## ", 1)[0]
    return [m.group(1) for m in re.finditer(r"^\| `((?:clipft|torchrun)[^`]*)`", section, flags=re.M)]


def test_the_readme_has_command_lines_and_a_table():
    assert len(readme_command_lines()) >= 20 and len(commands_table()) >= 10


@pytest.mark.parametrize("argv", readme_command_lines(), ids=lambda a: " ".join(a)[:60])
def test_readme_command_line_parses(argv):
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
    except SystemExit as e:
        if e.code == 0 and "--help" in argv or "-h" in argv:
            return
        pytest.fail(f"clipft {' '.join(argv)}: the parser refuses it")
    try:
        _split_extra(extra)
    except ConfigError as e:
        pytest.fail(f"clipft {' '.join(argv)}: {e}")


def test_every_commands_table_option_exists():
    subs = _subparsers(build_parser())
    problems = []
    for row in commands_table():
        words = row.replace("[", " ").replace("]", " ").replace("|", " ").split()
        if words[0] == "torchrun":
            words = words[words.index("clipft"):] if "clipft" in words else ["clipft", "train"]
        name = words[1]
        if name not in subs:
            problems.append(f"{row}: no command {name!r}")
            continue
        known = {o for a in subs[name]._actions for o in a.option_strings}
        for w in words[2:]:
            opt = w.split("=", 1)[0]
            if opt.startswith("--") and opt not in known and "." not in opt:
                problems.append(f"{row}: {name} has no option {opt}")
    assert problems == []


def test_every_command_is_in_the_commands_table():
    listed = {row.split()[1] for row in commands_table() if row.startswith("clipft ")}
    assert sorted(set(_subparsers(build_parser())) - listed) == []
