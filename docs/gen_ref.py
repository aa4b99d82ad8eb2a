"""Reference pages generated from the code at build time, so they cannot drift from it.

`config_reference()` reads the config schema (`clipft.config`: the nested dataclasses, their
`Literal` choices, the `_RANGES` / `_POSITIVE` tables and the comments written beside each field in
the source) and `cli_reference()` reads the argument parser (`clipft.cli.commands.build_parser()`).
`docs/hooks.py` hands both to MkDocs as pages; `python docs/gen_ref.py OUT_DIR` writes them as files.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import io
import sys
import tokenize
import typing
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
if str(SRC) not in sys.path:  # document this checkout's code, not an installed copy
    sys.path.insert(0, str(SRC))

# Choices owned by registries rather than by Literal types (config.py says so beside the fields).
_REGISTRY_CHOICES = {
    "data.format": "auto, or a format of the registry: {}",
    "model.backbone": "{}",
}


# Keys whose values `config.validate` checks in code rather than through a Literal type or `_RANGES`
# (tests/test_docs.py checks that validate still names each of them).
VALIDATED_IN_CODE = {
    "train.checkpoint_every": "`N` or `Nsteps` (optimizer steps), `Nmin` (minutes), `0` (epoch ends only)",
    "train.device": "`auto`, `cpu`, `cuda`, `cuda:N`",
    "eval.ks": "positive integers",
    "eval.zeroshot_templates": "each holds `{}`",
    "data.mean": "3 values",
    "data.std": "3 values, each > 0",
    "train.text_negatives": "`batch`, `all` or a positive integer",
}


def _field_comments(cls: type) -> dict[str, str]:
    """The comments of each dataclass field in its source: the block of comment lines just above it
    and the comment at the end of its line, joined."""
    source = inspect.getsource(cls)
    lines = source.splitlines()
    comments: dict[int, str] = {}  # line number (1-based) -> comment text
    code_lines: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
                              tokenize.ENDMARKER):
            code_lines.add(tok.start[0])
    out: dict[str, str] = {}
    names = {f.name for f in dataclasses.fields(cls)}
    prev = None  # (field, line, described only by a comment block above it)
    for i, line in enumerate(lines, start=1):
        head = line.strip().split(":", 1)[0]
        if head not in names or not line.startswith("    ") or line.startswith("     "):
            continue
        above, j = [], i - 1
        while j >= 1 and j in comments and j not in code_lines:  # a pure comment line
            above.insert(0, comments[j])
            j -= 1
        trailing = comments.get(i, "")
        # A field spanning several lines (a long default): comments on its continuation lines.
        k = i + 1
        while k <= len(lines) and lines[k - 1].startswith("     ") and lines[k - 1].strip():
            if k in comments:
                trailing = (trailing + " " + comments[k]).strip()
            k += 1
        out[head] = " ".join(above + ([trailing] if trailing else []))
        # A comment block above two consecutive fields describes both (image_column / caption_column).
        if not out[head] and prev is not None and prev[1] == i - 1 and prev[2]:
            out[head] = out[prev[0]]
        prev = (head, i, bool(above) and not trailing)
    return out


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return "string"
    if origin is tuple:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return {bool: "bool", int: "int", float: "float", str: "string"}.get(tp, str(tp))


def _default_text(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return "[" + ", ".join(_default_text(v) for v in value) + "]"
    if isinstance(value, str):
        return f'"{value}"'
    return repr(value)


def _registry_choices() -> dict[str, list[str]]:
    from clipft.data.formats import FORMAT_REGISTRY
    from clipft.model import BACKBONES
    return {"data.format": sorted(FORMAT_REGISTRY), "model.backbone": sorted(BACKBONES)}


def config_rows() -> list[dict[str, str]]:
    """One row per config key: key, type, default, allowed values, help."""
    from clipft import config as C

    registry = _registry_choices()
    rows = []
    for section, cls in C._sections().items():
        comments = _field_comments(cls)
        defaults = cls()
        for key, tp in C._field_types(cls).items():
            dotted = f"{section}.{key}"
            allowed = ""
            if typing.get_origin(tp) is typing.Literal:
                allowed = ", ".join(f"`{c}`" for c in C.choices(tp))
            elif dotted in registry:
                allowed = _REGISTRY_CHOICES[dotted].format(", ".join(f"`{c}`" for c in registry[dotted]))
            elif dotted in C._RANGES:
                lo, hi = C._RANGES[dotted]
                allowed = (f">= {C._num(lo)}" if hi is None else f"<= {C._num(hi)}" if lo is None
                           else f"{C._num(lo)} to {C._num(hi)}")
            elif dotted in C._POSITIVE:
                allowed = "> 0"
            elif dotted in VALIDATED_IN_CODE:
                allowed = VALIDATED_IN_CODE[dotted]
            rows.append({"key": dotted, "type": _type_name(tp), "default": _default_text(getattr(defaults, key)),
                         "allowed": allowed, "help": comments.get(key, "")})
    return rows


def _cell(text: str) -> str:
    """Plain text as one Markdown table cell (help strings hold `|` and `<placeholders>`)."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace("|", "\\|").replace("\n", " ")


def config_reference() -> str:
    from clipft import config as C

    out = ["# Configuration reference", "",
           "Generated from the config schema (`src/clipft/config.py`) each time the site is built.",
           "Set a key in a YAML file (see `configs/`), or on the command line with `--set section.key=value`",
           "(or the short form `--section.key=value`). Unknown keys, values that do not parse as the",
           "type, and values outside the allowed range or choices are refused before any work starts.", "",
           "Presets, named with `--config`: " + ", ".join(f"`{p}`" for p in C.PRESETS) +
           " (each is also a file in `configs/`).", ""]
    rows = config_rows()
    for section in C._sections():
        out += [f"## `{section}`", "", "| key | type | default | allowed | meaning |", "|---|---|---|---|---|"]
        for r in rows:
            if r["key"].split(".")[0] == section:
                out.append(f"| `{r['key']}` | {r['type']} | `{_cell(r['default'])}` | {_cell(r['allowed'])} | "
                           f"{_cell(r['help'])} |")
        out.append("")
    out += ["## Presets", ""]
    for name, preset in C.PRESETS.items():
        sets = [f"`{s}.{k}={_default_text(v).strip(chr(34))}`" for s, kv in preset.items() for k, v in kv.items()]
        out += [f"- `{name}`: " + ", ".join(sets)]
    out.append("")
    return "\n".join(out)


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _command_helps(parser: argparse.ArgumentParser) -> dict[str, str]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {c.dest: c.help or "" for c in action._choices_actions}


def _option_row(a: argparse.Action) -> str:
    names = ", ".join(f"`{o}`" for o in a.option_strings) or f"`{a.metavar or a.dest}`"
    if isinstance(a, argparse.BooleanOptionalAction):
        names = ", ".join(f"`{o}`" for o in a.option_strings)
    elif a.option_strings and a.nargs != 0:
        metavar = a.metavar or a.dest.upper()
        names += f" {metavar}" + (" ..." if a.nargs in ("+", "*") else "")
    choices = ", ".join(f"`{c}`" for c in a.choices) if a.choices else ""
    shown = a.default
    if isinstance(shown, list):
        shown = " ".join(map(str, shown))
    default = "" if (shown is None or shown is False or shown is argparse.SUPPRESS or shown == "" or a.required
                     or not a.option_strings) else f"`{shown}`"
    req = "required" if a.required or not a.option_strings else ""
    return f"| {names} | {_cell(a.help or '')} | {choices} | {default} | {req} |"


def cli_reference() -> str:
    from clipft.cli.commands import build_parser

    parser = build_parser()
    out = ["# Command-line reference", "",
           "Generated from the argument parser (`clipft.cli.commands.build_parser()`) each time the site",
           "is built. `python -m clipft ...` works as well as the `clipft` script. Options of the form",
           "`--section.key=value` are config overrides (the [configuration reference](config.md)).", "",
           "## `clipft`", "", "| option | help | choices | default | |", "|---|---|---|---|---|"]
    out += [_option_row(a) for a in parser._actions
            if not isinstance(a, (argparse._SubParsersAction, argparse._HelpAction))]
    out.append("")
    helps = _command_helps(parser)
    for name, sub in _subparsers(parser).items():
        out += [f"## `clipft {name}`", "", _cell(helps.get(name, "")), "",
                "| option | help | choices | default | |", "|---|---|---|---|---|"]
        out += [_option_row(a) for a in sub._actions if not isinstance(a, argparse._HelpAction)]
        out.append("")
        if sub.epilog:
            out += ["```text", sub.epilog.strip(), "```", ""]
    return "\n".join(out)


PAGES = {"reference/config.md": config_reference, "reference/cli.md": cli_reference}


def main(argv: list[str]) -> int:
    out = Path(argv[0] if argv else "docs")
    for rel, make in PAGES.items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_text(make())
        print(f"wrote {out / rel}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
