"""The manual (docs/, built with MkDocs) against the code.

The site builds in strict mode (a broken link, a missing page or anchor fails); every `clipft` command
line shown in docs/ parses with the real parser (the checks of tests/test_readme.py, reused); every
config key written as `--section.key`, `--set section.key=...` or `section.key=...` exists in the
schema; the design map names every module under src/clipft and only those; the reference pages are
generated from the schema and the parser."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from clipft import config as C
from clipft.cli.commands import _split_extra, build_parser
from clipft.config import ConfigError

from test_readme import _clipft_argvs, _code_lines

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
SRC = ROOT / "src" / "clipft"
sys.path.insert(0, str(DOCS))
import gen_ref  # noqa: E402  (docs/gen_ref.py)


def doc_pages() -> list[Path]:
    """The manual's Markdown pages (not docs/notes/, which the site leaves out), and the README."""
    pages = sorted(p for p in DOCS.rglob("*.md") if "notes" not in p.relative_to(DOCS).parts)
    return pages + [ROOT / "README.md"]


def doc_command_lines() -> list[tuple[str, list[str]]]:
    return [(p.relative_to(ROOT).as_posix(), argv) for p in doc_pages()
            for line in _code_lines(p.read_text()) for argv in _clipft_argvs(line)]


# --------------------------------------------------------------------------- the site builds

def test_the_site_builds_in_strict_mode(tmp_path):
    pytest.importorskip("mkdocs", reason="the docs extra (pip install -e '.[docs]') builds the manual")
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "NO_MKDOCS_2_WARNING": "1"}
    # Not -q: mkdocs then drops the warnings, and --strict counts no warning.
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"),
                        "-d", str(tmp_path / "site")], cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    site = tmp_path / "site"
    for page in ["reference/config", "reference/cli", "reference/api", "design", "measurements"]:
        assert (site / f"{page}.html").is_file(), page
    api = (site / "reference/api.html").read_text()
    assert "ImageTextModel" in api and "encode_images" in api and "clip_loss" in api  # docstrings rendered
    assert not (site / "notes").exists()  # docs/notes/ waits outside the site
    assert "fonts.googleapis.com" not in (site / "index.html").read_text()  # no font fetched at view time


def test_strict_build_refuses_a_broken_link(tmp_path):
    """The guard above is real: a page linking to a page that does not exist fails the strict build."""
    pytest.importorskip("mkdocs")
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "index.md").write_text("# x\n\n[gone](nowhere.md) and [anchor](#no-such-heading)\n")
    (tmp_path / "mkdocs.yml").write_text("site_name: t\nvalidation:\n  anchors: warn\n")
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
                       cwd=tmp_path, capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert r.returncode != 0 and "nowhere.md" in r.stdout + r.stderr


# --------------------------------------------------------------------------- command lines

def test_the_docs_show_command_lines():
    assert len(doc_command_lines()) >= 60


@pytest.mark.parametrize("where,argv", doc_command_lines(), ids=lambda x: " ".join(x)[:60] if isinstance(x, list) else x)
def test_docs_command_line_parses(where, argv):
    try:
        _args, extra = build_parser().parse_known_args(argv)
    except SystemExit as e:
        if e.code == 0 and ("--help" in argv or "-h" in argv):
            return
        pytest.fail(f"{where}: clipft {' '.join(argv)}: the parser refuses it")
    try:
        _split_extra(extra)
    except ConfigError as e:
        pytest.fail(f"{where}: clipft {' '.join(argv)}: {e}")


# --------------------------------------------------------------------------- config keys

_SECTIONS = "|".join(C._sections())
# `--set train.lr=...`, `--train.lr=...`, `--model.learnable_temperature`, `train.amp=auto`, `data.flip=swap`
_KEY = re.compile(rf"(?:--)(?P<a>(?:{_SECTIONS})\.[a-z_]+)\b|\b(?P<b>(?:{_SECTIONS})\.[a-z_]+)=")


def mentioned_keys(text: str) -> set[str]:
    return {m["a"] or m["b"] for m in _KEY.finditer(text)}


def test_the_key_pattern_finds_the_forms_the_docs_use():
    text = "--set train.lr=3e-4 --model.learnable_temperature=true `data.flip=swap` --train.bogus x clipft.data.formats"
    assert mentioned_keys(text) == {"train.lr", "model.learnable_temperature", "data.flip", "train.bogus"}


def test_every_config_key_in_the_docs_exists():
    known = {f"{s}.{f.name}" for s, cls in C._sections().items() for f in dataclasses.fields(cls)}
    unknown = sorted(f"{p.relative_to(ROOT)}: {k}" for p in doc_pages() for k in mentioned_keys(p.read_text())
                     if k not in known)
    assert unknown == []


# --------------------------------------------------------------------------- the design map

def source_modules() -> set[str]:
    """Every module file under src/clipft (package __init__ files stand for their package, `data/`)."""
    out = set()
    for p in SRC.rglob("*.py"):
        rel = p.relative_to(SRC).as_posix()
        out.add(rel[: -len("__init__.py")] if p.name == "__init__.py" and p.parent != SRC else rel)
    return out


def design_map_entries() -> list[str]:
    """The first column of the map's table rows in docs/design.md."""
    text = (DOCS / "design.md").read_text()
    section = text.split("## The map", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^\| `([^`]+)` \|", section, flags=re.M)


def test_the_design_map_names_every_module():
    missing = sorted(source_modules() - set(design_map_entries()))
    assert missing == [], f"modules without a line in docs/design.md's map: {missing}"


def test_the_design_map_names_only_modules_that_exist():
    entries = design_map_entries()
    assert len(entries) == len(set(entries)), "a module has two lines in the map"
    gone = sorted(set(entries) - source_modules())
    assert gone == [], f"docs/design.md's map names modules that do not exist: {gone}"


def test_a_new_module_without_a_line_is_caught(tmp_path, monkeypatch):
    """The check above fails for a module added without a line, and for a line whose module went."""
    fake = tmp_path / "clipft"
    for rel in source_modules():
        f = fake / (rel + "__init__.py" if rel.endswith("/") else rel)
        f.parent.mkdir(parents=True, exist_ok=True)
        f.touch()
    (fake / "train" / "newthing.py").touch()
    monkeypatch.setattr(sys.modules[__name__], "SRC", fake)
    assert "train/newthing.py" in source_modules() - set(design_map_entries())
    (fake / "hub.py").unlink()
    assert "hub.py" in set(design_map_entries()) - source_modules()


# --------------------------------------------------------------------------- generated reference pages

def test_the_config_reference_lists_every_key_with_its_default_and_choices():
    page = gen_ref.config_reference()
    for section, cls in C._sections().items():
        for f in dataclasses.fields(cls):
            assert f"| `{section}.{f.name}` |" in page
    rows = {r["key"]: r for r in gen_ref.config_rows()}
    assert rows["train.amp"]["allowed"] == "`auto`, `bf16`, `fp16`, `off`" and rows["train.amp"]["default"] == '"auto"'
    assert rows["train.lr"]["allowed"] == "> 0"
    assert rows["data.val_fraction"]["allowed"] == "0 to 0.9"
    assert "resnet50" in rows["model.backbone"]["allowed"] and "csv" in rows["data.format"]["allowed"]
    # help comes from the comments beside the field in config.py, also from a block above it
    assert "JPEG decoding processes" in rows["data.num_workers"]["help"]
    assert "Nmin" in rows["train.checkpoint_every"]["help"]
    assert rows["data.caption_column"]["help"] == rows["data.image_column"]["help"] != ""


def test_the_keys_validated_in_code_are_still_checked_there():
    import inspect
    source = inspect.getsource(C.validate)
    for key in gen_ref.VALIDATED_IN_CODE:
        section, name = key.split(".")
        assert f"cfg.{section}.{name}" in source or f'"{key}"' in source, key


def test_the_cli_reference_lists_every_command_and_option():
    page = gen_ref.cli_reference()
    action = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    for name, sub in action.choices.items():
        assert f"## `clipft {name}`" in page
        for a in sub._actions:
            for opt in a.option_strings:
                if opt not in ("-h", "--help"):
                    assert f"`{opt}`" in page.split(f"## `clipft {name}`", 1)[1].split("\n## ", 1)[0], (name, opt)
