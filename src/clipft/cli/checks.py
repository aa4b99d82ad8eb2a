"""The checks every command's arguments pass before any library is imported (torch takes seconds):
inputs that must exist and be of the right kind, outputs whose path can be written, --config and --set,
--labels-from, and a CUDA device on a machine without a GPU driver (that one is in `args`). Each
mistake is one ConfigError line naming the path or value and what to give instead."""

from __future__ import annotations

import argparse
import zipfile
from pathlib import Path

from .args import _build_config
from ..config import Config, ConfigError, apply_overrides, load_config, preset_config


# Commands whose inputs must exist, checked before any library is imported: (attribute, the line
# when it is missing; the same words the command's library gives).
_DATA = ("data", "{}: no such file or directory")
_CKPT = ("checkpoint", "{}: checkpoint not found")
_RUN = ("run", "{}: no such run directory")
_KARPATHY = ("karpathy", "{}: Karpathy split file not found (`clipft download coco --out DATA --karpathy` fetches "
                         "dataset_coco.json)")
_VAL = ("val_data", "{}: no such file or directory (--val-data)")
_MUST_EXIST = {
    "cache-text": [_DATA, _VAL], "validate": [_DATA, _VAL], "prepare-images": [_DATA, _VAL], "train": [_DATA, _VAL],
    "shard": [_VAL], "evaluate": [_CKPT, _DATA, _KARPATHY, _VAL], "zeroshot": [_CKPT, _DATA, _KARPATHY],
    "visualize": [_CKPT, _DATA, _RUN, _KARPATHY,
                  ("embeddings", "{}: embeddings file not found (clipft evaluate --save-embeddings writes one)")],
    "inspect-data": [_DATA], "export": [_CKPT, ("check_images", "{}: not a folder (it does not exist)")],
    "report": [_RUN, _DATA, ("notes", "{}: notes file not found"), ("compare", "{}: no such run directory"),
               ("ablation", "{}: no such study directory (the --out folder of clipft ablate)")],
    "ablate": [_DATA, ("configs_file", "{}: configurations file not found")],
    "search": [("image", "{}: no such image file")],
    "index": [("folder", "{}: not a folder (it does not exist)")],
    "embed": [("images", "{}: not a directory (it does not exist)")],
}


def _names_shards(spec: str) -> bool:
    """`--data` as a shard URL or brace pattern (`pipe:...`, `file:...`, `DIR/train-{000000..000123}.tar`),
    not a path that must exist (the same forms as `data.shards.is_pattern`, without importing it)."""
    return spec.startswith(("pipe:", "file:")) or ("{" in spec and ".." in spec and "}" in spec)


# File suffixes that are never a dataset, by what they are: --data given one of these is a mix-up of
# arguments (a checkpoint for --data, say), answered before torch instead of after the data loader started.
_NOT_DATA = {**dict.fromkeys((".pt", ".pth", ".ckpt", ".safetensors", ".onnx"), "a model file"),
             **dict.fromkeys((".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif"), "an image"),
             **dict.fromkeys((".yaml", ".yml"), "a config file"),
             ".zip": "an archive"}  # not .gz: webdataset shards may be .tar.gz


def _check_not_data(value: str, option: str, overrides: list[str]) -> None:
    """A file whose suffix says it is no dataset (unless data.format is forced with --set)."""
    what = _NOT_DATA.get(Path(value).suffix.lower())
    if what and Path(value).is_file() and not any(o.lstrip("-").startswith("data.format") for o in overrides):
        raise ConfigError(f"{value}: {what}, not a dataset; {option} takes a COCO or Flickr folder, a folder of "
                          "images with captions, or a CSV/TSV/JSONL file" +
                          (" (unpack the archive first)" if what == "an archive" else ""))


def _check_inputs_exist(args: argparse.Namespace) -> None:
    """A missing --data / --checkpoint / folder is one line before torch is imported (seconds); so is a
    folder given as the checkpoint file, or a file where a folder of images or a run is expected."""
    command = getattr(args, "command", None)
    for attr, line in _MUST_EXIST.get(command, []):
        values = getattr(args, attr, None)
        for value in values if isinstance(values, list) else [values]:  # --compare takes several runs
            if attr == "data" and value and _names_shards(str(value)):
                continue  # a webdataset pattern or URL: data/shards.py checks what it names
            if value and not Path(value).exists():
                raise ConfigError(line.format(value))
        value = values
        if not value or isinstance(value, list):
            continue
        if attr in ("data", "val_data"):
            _check_not_data(str(value), "--data" if attr == "data" else "--val-data",
                            list(getattr(args, "overrides", [])) + list(getattr(args, "extra_overrides", [])))
        if attr == "checkpoint" and Path(value).is_dir():
            best = Path(value) / "best.pt"
            raise ConfigError(f"{value}: a folder, not a checkpoint file" +
                              (f"; did you mean {best}?" if best.is_file() else
                               " (give the best.pt or last.pt that clipft train wrote)"))
        if attr == "checkpoint" and not zipfile.is_zipfile(value):  # every torch.save file is a zip archive
            raise ConfigError(f"{value} cannot be read: not a readable checkpoint (not a PyTorch file: another "
                              "kind of file, or one cut short); give the best.pt or last.pt that clipft train wrote")
        if attr == "run" and not Path(value).is_dir():
            raise ConfigError(f"{value}: not a directory (give the run directory that `clipft train --out` wrote)")
        if attr in ("folder", "images", "check_images") and not Path(value).is_dir():
            raise ConfigError(f"{value}: not a folder; give the folder of images (searched recursively)")
    model = getattr(args, "model", None) if command in ("index", "embed") else None
    if model and not Path(model).expanduser().exists():
        from ..hub import names_local_path
        if names_local_path(str(model)):
            raise ConfigError(f"{model}: not found (expected an export folder, a checkpoint, or an HF CLIP model name)")
    for index in (getattr(args, "index", None) or []) if command == "serve" else []:
        if not Path(index).exists():
            raise ConfigError(f"{index}: no clipft index here (build one with `clipft index FOLDER --model MODEL`)")
    if command == "search" and not Path(args.index).exists():
        raise ConfigError(f"{args.index}: no clipft index here (build one with `clipft index FOLDER --model MODEL`)")
    for image in (getattr(args, "image", None) or []) if command == "zeroshot" else []:
        if not Path(image).is_file():
            what = "a folder, not an image file" if Path(image).is_dir() else "no such file"
            raise ConfigError(f"{image}: {what} (--image takes image files)")


def _check_config_early(args: argparse.Namespace) -> None:
    """--config and --set of every command but train (which resolves its config before torch already),
    checked before any import: a typo used to wait for torch, and `demo` wrote its dataset first.
    Checkpoint commands and ablate apply --set to a config known only later (the checkpoint's, each
    study run's): here their keys, sections and types are checked against the defaults."""
    command = getattr(args, "command", None)
    overrides = list(getattr(args, "overrides", [])) + list(getattr(args, "extra_overrides", []))
    if command in ("train", None):
        return
    if command in ("evaluate", "zeroshot", "visualize", "ablate"):
        if overrides:
            apply_overrides(Config(), overrides)
    elif command == "demo":
        load_config(None, overrides, base=preset_config("demo"))
    elif hasattr(args, "config"):  # validate, cache-text, prepare-images, shard, inspect-data
        _build_config(args)


# Where each command writes, checked before any work: ("dir" | "file", attribute, option, an example file
# name for a folder given where a file is wanted). A file in the way used to surface after minutes of work
# as an unexpected FileExistsError / NotADirectoryError (or a stray OUT.tmp).
_OUTPUTS = {
    "make-data": [("dir", "out", "--out", "")], "shard": [("dir", "out", "--out", "")],
    "train": [("dir", "out", "--out", "")], "export": [("dir", "out", "--out", "")],
    "ablate": [("dir", "out", "--out", "")], "demo": [("dir", "out", "--out", "")],
    "download": [("dir", "out", "--out", "")], "index": [("dir", "index", "--index", "")],
    "zeroshot": [("dir", "out", "--out", ""), ("file", "plot", "--plot", "zeroshot.png")],
    "validate": [("file", "out", "--out", "report.json")],
    "evaluate": [("file", "out", "--out", "metrics.json"),
                 ("file", "save_embeddings", "--save-embeddings", "embeddings.safetensors")],
    "inspect-data": [("file", "out", "--out", "samples.png")],
    "embed": [("file", "out", "--out", "embeddings.safetensors")],
    "visualize": [("file", "out", "--out", "picture.png")],
}


def _check_outputs(args: argparse.Namespace) -> None:
    """An output path that cannot be written for the shape of it (a file where a folder goes, a folder
    where a file goes, a file among its parents) is one line before any import or work."""
    command = getattr(args, "command", None)
    data, out = getattr(args, "data", None), getattr(args, "out", None)
    if command in ("train", "ablate") and data and out and Path(out).resolve() == Path(data).resolve():
        # The run's checkpoints, caches and config would mix with the dataset's files (and a report or a
        # --no-resume would treat the dataset folder as a run).
        raise ConfigError(f"{out}: the dataset folder (--data); give the run a folder of its own, e.g. runs/NAME")
    for kind, attr, option, example in _OUTPUTS.get(command, []):
        value = getattr(args, attr, None)
        if not value or (attr == "save_embeddings" and value == "auto"):
            continue
        if command == "visualize" and args.kind in ("all", "zero-shot"):
            kind = "dir"  # these write several pictures into the folder --out names
        path = Path(value)
        for parent in path.parents:  # the nearest existing parent must be a folder
            if parent.exists():
                if not parent.is_dir():
                    raise ConfigError(f"{parent}: a file, not a folder, so {option} {value} cannot be written; "
                                      "choose another path")
                break
        if kind == "dir" and path.exists() and not path.is_dir():
            raise ConfigError(f"{value}: a file, not a folder; {option} takes a folder (new, or one clipft wrote)")
        if kind == "file" and path.is_dir():
            raise ConfigError(f"{value}: a folder, not a file; {option} takes a file path, e.g. {path / example}")


def _check_labels_from(spec: str | None) -> None:
    """--labels-from: a shapes rule or a COCO instances JSON that exists (a typo such as `shape` was read
    as a file name and failed after the model had loaded)."""
    if spec and not (spec == "shapes" or spec.startswith("shapes:")) and not Path(spec).is_file():
        raise ConfigError(f"--labels-from {spec}: neither shapes, shapes:shape, shapes:color nor an existing "
                          "COCO instances_<split>2014.json file")
