"""RUN/commands.txt: one line for every clipft command run against a run directory.

Each line is `<ISO date>  clipft <version>  <the full command line>`, so a run says how it was
made (the lab's train.txt / test.txt); the report's "Reproduce" section lists the lines. A
command that did not finish says so at the end of its line (`# exit 2`).
"""

from __future__ import annotations

import argparse
import os
import shlex
from datetime import datetime, timezone
from pathlib import Path

COMMANDS_TXT = "commands.txt"
# Commands that read or write a run directory, and how each names it.
RUN_COMMANDS = ("train", "demo", "evaluate", "visualize", "zeroshot", "report", "export")


def run_dir_of(args: argparse.Namespace) -> Path | None:
    """The run directory a parsed command acts on (None for commands that have none)."""
    if args.command not in RUN_COMMANDS:
        return None
    if args.command in ("train", "demo"):  # both train into --out
        return Path(args.out)
    if getattr(args, "run", None):
        return Path(args.run)
    ckpt = getattr(args, "checkpoint", None)
    return Path(ckpt).parent if ckpt else None


def command_line(argv: list[str]) -> str:
    """The command as a user would type it again (shell-quoted)."""
    return shlex.join(["clipft", *argv])


def record_command(run_dir: str | Path, argv: list[str], exit_code: int | None = None) -> bool:
    """Append one line to RUN/commands.txt; False (nothing written) when RUN is not a run
    directory yet (no config.json) or on a torchrun rank other than 0."""
    from .. import __version__
    run_dir = Path(run_dir)
    if os.environ.get("RANK", "0") != "0" or not (run_dir / "config.json").is_file():
        return False
    when = datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds")
    tail = f"  # exit {exit_code}" if exit_code else ""
    with open(run_dir / COMMANDS_TXT, "a") as f:
        f.write(f"{when}  clipft {__version__}  {command_line(argv)}{tail}\n")
    return True


def read_commands(run_dir: str | Path) -> list[str]:
    """The lines of RUN/commands.txt (empty when the run has none)."""
    path = Path(run_dir) / COMMANDS_TXT
    return [line for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
