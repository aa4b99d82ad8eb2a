"""MkDocs hook: the configuration and command-line reference pages are generated from the code
(`docs/gen_ref.py`) on every build, never stored, so they cannot drift from the schema or the parser."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gen_ref  # noqa: E402  (docs/gen_ref.py, beside this file)
from mkdocs.structure.files import File  # noqa: E402


def on_files(files, config):
    for rel, make in gen_ref.PAGES.items():
        existing = files.get_file_from_path(rel)
        if existing is not None:
            files.remove(existing)
        files.append(File.generated(config, rel, content=make()))
    return files
