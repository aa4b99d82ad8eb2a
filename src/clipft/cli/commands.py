"""Command line: the only place that parses argv. Every command calls a library function.

Expected failures (bad data, bad config, missing model, diverged run) print one line
`clipft: error: ...` and exit 2, without a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import warnings
from pathlib import Path

from .args import (_add_config_args, _add_device, _add_overrides, _add_quiet, _build_config, _split_extra,
                       check_cuda_present, int_range, non_negative_int, pixels, positive_int)
from .checks import _check_config_early, _check_inputs_exist, _check_labels_from, _check_outputs
from .model_commands import add_model_commands, add_search_commands
from .tool_commands import add_tool_commands
from .. import __version__
from ..config import PRESETS, Config, ConfigError, load_config, preset_config, resolve_config_arg

EXIT_USAGE = 2
EXIT_UNEXPECTED = 1

DESCRIPTION = """\
clipft: teach an image encoder (ResNet + MLP head) to match a frozen CLIP text encoder on
captioned images, then measure it (Recall@K, zero-shot classification, pictures, a report).

The usual way through:
  clipft download coco --out DATA          (or: clipft make-data shapes --out DATA, or your CSV/folder)
  clipft validate --data DATA              check the dataset before spending time on it
  clipft train --data DATA --out RUN       (--config coco-rn50 | demo | FILE; resumes an existing RUN)
  clipft evaluate --checkpoint RUN/best.pt --data DATA
  clipft report RUN
Everything at once, on the CPU and offline: clipft demo.
Run `clipft COMMAND --help` for a command's options."""

TRAIN_EPILOG = f"""\
Without --config the built-in defaults apply: ResNet50 with ImageNet weights against the frozen
openai/clip-vit-base-patch32 text encoder, batch 128, 15 epochs (a GPU run on COCO). Presets:
{", ".join(PRESETS)} (coco-rn50: that COCO run, choosing best.pt on Karpathy's val split when
DATA holds dataset_coco.json; demo: a ResNet18 from scratch at 64 px against the offline MiniLM
text encoder, on the CPU); or a YAML file such
as configs/coco-rn50.yaml. Every value can be changed with --set SECTION.KEY=VALUE.

Rerunning into a run directory resumes it (from OUT/last.pt, or OUT/last.prev.pt when last.pt does
not load) once the config and the data match the stored run; only train.epochs, train.log_every,
train.checkpoint_every, train.device and a few speed settings may change. A mid-epoch checkpoint is
written every train.checkpoint_every (default 10min) and on SIGTERM / SIGUSR1 (exit 143 / 138)."""


# The error classes a command raises for a user's mistake, by module: an error can only come from a
# module that was imported, so they are looked up in sys.modules instead of importing every module
# (and torch with them) just to name the classes, which made every argument error wait for torch.
_EXPECTED_ERRORS = {
    "clipft.config": ("ConfigError",), "clipft.train.checkpoint": ("CheckpointError",),
    "clipft.data.records": ("DataError",), "clipft.distributed": ("DistributedError",),
    "clipft.data.download": ("DownloadError",), "clipft.eval.evaluate": ("EvaluationError",),
    "clipft.model": ("ModelError",), "clipft.report.errors": ("ReportError",), "clipft.runtime": ("StorageError",),
    "clipft.search.index": ("SearchError",), "clipft.train.preempt": ("Preempted",),
    "clipft.train.resume": ("ResumeError",), "clipft.train.lock": ("RunInUseError",),
    "clipft.text": ("TextEncoderError",), "clipft.train.errors": ("TrainingError",),
}


def _expected_errors() -> tuple[type[BaseException], ...]:
    """The expected-error classes of the modules imported so far (see _EXPECTED_ERRORS)."""
    found = [ConfigError]
    for module, names in _EXPECTED_ERRORS.items():
        if (mod := sys.modules.get(module)) is not None:
            found += [getattr(mod, n) for n in names if hasattr(mod, n)]
    return tuple(found)


def _is_expected(error: BaseException) -> bool:
    return isinstance(error, _expected_errors())


def _add_split_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--split", default="val",
                   help="evaluation protocol: val (the configured subset, default), val-full (whole val2014), val-heldout "
                        "(validation images outside the subset that chose best.pt), "
                        "karpathy-test / karpathy-val / karpathy-test-1k (5 folds of 1,000; with --karpathy), "
                        "test (a Flickr folder's test split), or any split name")
    p.add_argument("--karpathy", metavar="JSON", help="Karpathy's dataset_coco.json (for --split karpathy-test)")


# --------------------------------------------------------------------------- commands

def cmd_make_data(args: argparse.Namespace) -> int:
    from ..data.shapes import make_shapes_dataset
    if args.train == 0 and args.val == 0:
        raise ConfigError("make-data: --train 0 --val 0 would write an empty dataset; ask for some images")
    out = make_shapes_dataset(Path(args.out), n_train=args.train, n_val=args.val, seed=args.seed,
                              image_size=args.image_size)
    print(f"wrote shapes dataset ({args.train} train / {args.val} val images) in COCO 2014 layout to {out}")
    return 0


def _add_val_data(p: argparse.ArgumentParser) -> None:
    p.add_argument("--val-data", metavar="PATH",
                   help="validation data: a second CSV/TSV/JSONL file or folder (same as --set data.val_path=PATH)")


def _val_data_override(args: argparse.Namespace) -> None:
    """--val-data PATH is a shortcut for the override data.val_path=PATH."""
    if getattr(args, "val_data", None):
        args.overrides = list(args.overrides) + [f"data.val_path={args.val_data}"]


def cmd_cache_text(args: argparse.Namespace) -> int:
    from ..data import load_split, text_cache_file
    from ..runtime import resolve_device
    from ..text import get_text_embeddings, load_text_encoder
    _val_data_override(args)
    cfg = _build_config(args)
    cfg.text.encoder = args.text_encoder or cfg.text.encoder
    root = Path(args.data)
    device = resolve_device(args.device)
    splits = [(split, load_split(root, split, cfg.data)) for split in args.split]  # bad data fails before the load
    encoder = load_text_encoder(cfg.text.encoder, device=device, max_length=cfg.text.max_length,
                                amp=cfg.train.amp)  # once for all splits
    for split, data in splits:
        emb, info = get_text_embeddings(data.captions, cfg.text.encoder, text_cache_file(root, split, cfg),
                                        device=device, batch_size=cfg.text.batch_size,
                                        max_length=cfg.text.max_length, on_mismatch=cfg.text.on_mismatch,
                                        encoder=encoder, progress=not args.quiet)
        state = f"built in {info['seconds']:.1f}s" if info["built"] else "up to date (fingerprint matches)"
        print(f"{split}: {emb.shape[0]} captions x {emb.shape[1]} dims -> {info['path']} ({state})")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from ..data.validate import format_report, report_destination, validate_data, write_report_json
    cfg = _build_config(args)
    cfg.text.encoder = args.text_encoder or cfg.text.encoder
    # The JSON only where asked (--out): the user's data folder is theirs, not a place for our files.
    out = report_destination(args.data, args.out) if args.out else None  # checked before the work
    report = validate_data(args.data, cfg, val_data=args.val_data, check_tokens=not args.no_tokens,
                           progress=not args.quiet, deep=args.deep)
    print(format_report(report))
    if out is not None:
        print(f"wrote {write_report_json(report, out)}")
    return 0 if report["ok"] else 1


def cmd_prepare_images(args: argparse.Namespace) -> int:
    from ..data.prepare import prepare_split
    _val_data_override(args)
    cfg = _build_config(args)
    for split in args.split:
        info = prepare_split(args.data, split, cfg, size=args.size, workers=args.workers, progress=not args.quiet)
        if info["size"] != cfg.data.prepared_size:  # an explicit --size: training looks for data.prepared_size
            print(f"{split}: prepared at {info['size']} px; train with --set data.prepared_size={info['size']} "
                  "to read it" + (f" (and data.image_size <= {info['size']})" if info["size"] < cfg.data.image_size
                                  else ""))
        print(f"{split}: {info['images']} images ({info['bad']} unreadable, skipped) -> {info['path']} "
              f"in {info['seconds']:.1f}s")
    return 0


def cmd_shard(args: argparse.Namespace) -> int:
    from ..data.shard_writer import write_shards
    _val_data_override(args)
    cfg = _build_config(args)
    report = write_shards(args.data, cfg.data, args.out, shard_size=args.shard_size, image_size=args.image_size,
                          splits=args.split, progress=not args.quiet)
    for split, info in report.items():
        print(f"{split}: {info['samples']} samples in {len(info['shards'])} shard(s) ({info['bad']} unreadable "
              f"image(s) skipped) -> {args.out} in {info['seconds']:.1f}s")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Also the entry point of every process under `torchrun ... -m clipft train` (see distributed.py)."""
    from ..train.rundir import resolve_run_config
    _val_data_override(args)
    overrides = list(args.overrides) + list(args.extra_overrides)
    kind, value = resolve_config_arg(args.config) if args.config is not None else ("file", None)
    base = preset_config(value) if kind == "preset" else None
    cfg_file = value if kind == "file" else None
    cfg = resolve_run_config(args.out, cfg_file, overrides, base=base, resume=args.resume,
                             explicit=args.config is not None)  # a bad config is refused before torch loads
    check_cuda_present(cfg.train.device, "train.device")
    from ..distributed import is_main
    from ..train.loop import train
    created = not Path(args.out).exists()
    try:
        summary = train(cfg, args.data, args.out, resume=args.resume, progress=not args.quiet)
    except RuntimeError as e:  # torch.OutOfMemoryError is one too
        from ..train.chunked import out_of_memory_advice
        from ..runtime import is_out_of_memory
        from ..train.errors import TrainingError
        _remove_if_empty(Path(args.out) if created and is_main() else None)
        if not is_out_of_memory(e):
            raise
        last = Path(args.out) / "last.pt"
        kept = f"; {last} is intact (rerun with the setting to resume from it)" if last.is_file() else ""
        raise TrainingError(out_of_memory_advice(cfg.train.batch_size, cfg.train.embed_chunk, cfg.model.head_norm) + kept) from None
    except BaseException:
        _remove_if_empty(Path(args.out) if created and is_main() else None)
        raise
    if not is_main():  # under torchrun: one line per job, from rank 0
        return 0
    print(f"done: {summary['epochs']} epochs, best mean R@5 {summary['best_mean_R@5']:.2f}% "
          f"(epoch {summary['best_epoch']}); checkpoints in {args.out}")
    return 0


def _remove_if_empty(folder: Path | None) -> None:
    """A run directory this command created and left holding nothing but its config (a failed start)
    goes again: a rerun must not resume the config that failed."""
    if folder is not None and folder.is_dir() and {p.name for p in folder.iterdir()} <= {"config.json"}:
        shutil.rmtree(folder, ignore_errors=True)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from ..eval.evaluate import evaluate_checkpoint, format_comparison_table, format_fold_spread, format_recall_table
    _val_data_override(args)
    cfg = _checkpoint_config(args)
    save = args.save_embeddings
    if save == "auto":
        save = str(Path(args.checkpoint).parent / f"embeddings_{args.split}.safetensors")
    from .. import distributed
    # Under torchrun: one process per GPU (gloo on the CPU); each embeds its part of the images and
    # rank 0 scores all of them and writes the files. Alone: a no-op.
    ctx = distributed.setup(args.device)
    try:
        m = evaluate_checkpoint(args.checkpoint, args.data, split=args.split, cfg=cfg, out=args.out,
                                device=str(ctx.device) if ctx.distributed else args.device,
                                progress=not args.quiet, karpathy=args.karpathy,
                                compare_zero_shot=args.compare_zero_shot, save_embeddings=save)
    finally:
        distributed.teardown(ctx)
    if m is None:  # a rank other than 0: rank 0 reports
        return 0
    print(f"{m['protocol']}")
    print(format_comparison_table(m) if "zero_shot" in m else format_recall_table(m))
    if "folds" in m:
        print(format_fold_spread(m))
    if m.get("skipped_images"):
        print(f"{m['skipped_images']} unreadable image(s) left out (with their captions)")
    for f in m["files"] + ([m["embeddings"]] if "embeddings" in m else []):
        print(f"wrote {f}")
    return 0


def _checkpoint_config(args: argparse.Namespace) -> Config | None:
    """The checkpoint's saved config with --set overrides applied (None without overrides)."""
    from ..config import from_dict, to_dict
    from ..model import read_checkpoint
    overrides = list(getattr(args, "overrides", [])) + list(getattr(args, "extra_overrides", []))
    if not overrides:
        return None
    saved = from_dict(read_checkpoint(args.checkpoint)["config"])
    before = to_dict(saved)["model"]
    cfg = load_config(None, overrides, base=saved)
    # The architecture comes from the checkpoint's weights: a model key that says otherwise would be
    # silently ignored (the tower is rebuilt from the checkpoint), so it is refused.
    changed = [f"model.{k}={v} (the checkpoint has {before[k]!r})" for k, v in to_dict(cfg)["model"].items()
               if v != before[k]]
    if changed:
        raise ConfigError(f"{args.checkpoint}: {'; '.join(changed)}: the model is fixed by the checkpoint; "
                          "drop the --set model.* override (data, text and eval keys can be changed)")
    return cfg


def cmd_zeroshot(args: argparse.Namespace) -> int:
    _check_labels_from(args.labels_from)
    # The argument checks come before the import (torch: seconds), so that a mistake answers at once.
    if bool(args.image) == bool(args.data):
        raise ConfigError("zeroshot: give either --image PATH ... or --data ROOT")
    if args.image and not args.labels:
        raise ConfigError("zeroshot --image: give the class names with --labels")
    if not args.image and not args.labels_from:
        raise ConfigError("zeroshot --data: say where the ground truth comes from with --labels-from "
                          "(shapes, shapes:shape, shapes:color, or a COCO instances_*.json)")
    from ..eval.zeroshot import zeroshot_dataset, zeroshot_images
    if args.image:
        results = zeroshot_images(args.checkpoint, args.image, args.labels, templates=args.template,
                                  device=args.device, k=args.top_k, plot=args.plot)
        for r in results:
            print(r["path"])
            for label, p in r["top"]:
                print(f"  {p:6.3f}  {label}")
        if args.plot:
            print(f"wrote {args.plot}")
        return 0
    cfg = _checkpoint_config(args)
    r = zeroshot_dataset(args.checkpoint, args.data, split=args.split, labels_from=args.labels_from,
                         labels=args.labels, templates=args.template, cfg=cfg, device=args.device,
                         out_dir=args.out, karpathy=args.karpathy, n_examples=args.examples, seed=args.seed,
                         progress=not args.quiet)
    print(f"{r['protocol']}")
    print(f"labels: {r['rule']} ({len(r['classes'])} classes; {r['num_images']} images scored, "
          f"{r['unlabelled_images']} without a single label left out)")
    print(f"top-1 {r['top1']:.2f}%  top-5 {r['top5']:.2f}%  (chance {r['chance_top1']:.2f}% / {r['chance_top5']:.2f}%)")
    for key in ("json", "confusion_png", "examples_png"):
        if key in r:
            print(f"wrote {r[key]}")
    return 0


def cmd_visualize(args: argparse.Namespace) -> int:
    if args.kind == "curves":
        from ..train.rundir import plot_run_curves
        if not args.run:
            raise ConfigError("visualize curves: give the run directory with --run RUN")
        print(f"wrote {plot_run_curves(args.run, args.out)}")
        return 0
    if not args.checkpoint or not args.data:
        raise ConfigError(f"visualize {args.kind}: needs --checkpoint CKPT and --data ROOT")
    _check_labels_from(args.labels_from)
    from ..eval.pictures import write_visualization
    written, notes = write_visualization(
        args.kind, args.checkpoint, args.data, split=args.split, cfg=_checkpoint_config(args), device=args.device,
        karpathy=args.karpathy, embeddings_file=args.embeddings, queries=args.queries, n=args.n, seed=args.seed,
        heatmap_images=args.heatmap_images, labels=args.labels, labels_from=args.labels_from,
        templates=args.template, out=args.out, progress=not args.quiet)
    for note in notes:
        print(note)
    for w in written:
        print(f"wrote {w}")
    return 0


# --------------------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="clipft", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--version", action="version", version=f"clipft {__version__}")
    p.add_argument("--debug", action="store_true",
                   help="show the Python traceback of an error (also accepted after the command)")
    sub = p.add_subparsers(dest="command", required=True)
    # Four groups, in the order `clipft --help` lists the commands.
    _add_data_and_train_commands(sub)
    _add_checkpoint_commands(sub)
    add_tool_commands(sub)  # inspect-data, report, download, ablate, demo (tool_commands)
    add_model_commands(sub)  # export, embed (cli_models)
    add_search_commands(sub)  # index, search, serve (cli_models)
    return p


def _add_data_and_train_commands(sub) -> None:
    """make-data, cache-text, validate, prepare-images, train."""
    s = sub.add_parser("make-data", help="write a synthetic dataset in COCO 2014 layout")
    s.add_argument("kind", choices=["shapes"], help="shapes: 1-3 coloured shapes per image, 5 captions each")
    s.add_argument("--out", required=True, help="dataset folder to write (train2014/, val2014/, annotations/)")
    s.add_argument("--train", type=non_negative_int, default=2000, help="train images (default 2000)")
    s.add_argument("--val", type=non_negative_int, default=500, help="val images (default 500)")
    s.add_argument("--seed", type=non_negative_int, default=0, help="random seed: the same seed writes the same "
                                                                     "dataset (default 0)")
    s.add_argument("--image-size", type=pixels, default=128, help="side of the square images in px (default 128)")
    s.set_defaults(func=cmd_make_data)

    s = sub.add_parser("cache-text", help="embed every caption of a split once with the frozen text encoder")
    s.add_argument("--data", required=True, help="COCO root, CSV/TSV/JSONL file, or image folder")
    s.add_argument("--split", nargs="+", default=["train", "val"], help="splits to embed (default: train val)")
    s.add_argument("--text-encoder", help="HF name or local dir (default: text.encoder of the config)")
    _add_device(s)
    _add_val_data(s)
    _add_quiet(s, "no progress bar")
    _add_config_args(s)
    s.set_defaults(func=cmd_cache_text)

    s = sub.add_parser("validate", help="check a dataset before training (report printed and written as JSON; "
                                        "exit 1 if training would be spoiled)")
    s.add_argument("--data", required=True, help="COCO root, CSV/TSV/JSONL file, or image folder")
    _add_val_data(s)
    s.add_argument("--out", metavar="FILE.json", help="also write the report as JSON to this file (default: "
                                                      "printed only; nothing is written into the data folder)")
    s.add_argument("--text-encoder", help="tokenizer for the token-length check (default: text.encoder)")
    s.add_argument("--no-tokens", action="store_true", help="skip the token-length check (no text encoder load)")
    s.add_argument("--deep", action="store_true", help="also hash every chunk of the prepared image caches")
    _add_quiet(s, "no progress bar")
    _add_config_args(s)
    s.set_defaults(func=cmd_validate)

    s = sub.add_parser("prepare-images", help="decode every image once into a uint8 cache that training reads")
    s.add_argument("--data", required=True, help="COCO root, CSV/TSV/JSONL file, or image folder")
    _add_val_data(s)
    s.add_argument("--split", nargs="+", default=["train", "val"], help="splits to prepare (default: train val)")
    s.add_argument("--size", type=pixels, default=None,
                   help="stored square side, centre square resized as evaluation does (default: "
                        "data.prepared_size, 224: the size training reads, small images included)")
    s.add_argument("--workers", type=positive_int, default=None, help="processes (default: all cores)")
    _add_quiet(s)
    _add_config_args(s)
    s.set_defaults(func=cmd_prepare_images)

    s = sub.add_parser("shard", help="write webdataset shards (train-*.tar, val-*.tar, shards.json, sizes.json) "
                       "from any dataset clipft reads")
    s.add_argument("data", help="COCO root, Flickr folder, CSV/TSV/JSONL file, or image folder")
    s.add_argument("--out", required=True, help="directory for the shards")
    _add_val_data(s)
    s.add_argument("--split", nargs="+", default=None, help="splits to write (default: train val)")
    s.add_argument("--shard-size", type=positive_int, default=1000, help="samples per shard (default 1000)")
    s.add_argument("--image-size", type=pixels, default=256,
                   help="short side of the stored JPEGs (default 256; smaller images are kept as they are)")
    _add_quiet(s)
    _add_config_args(s)
    s.set_defaults(func=cmd_shard)

    s = sub.add_parser("train", help="train the image tower (resumes a run already in --out)", epilog=TRAIN_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("--data", required=True, help="COCO root, CSV/TSV/JSONL file, or image folder")
    _add_val_data(s)
    s.add_argument("--out", required=True, help="run directory")
    s.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                   help="continue from OUT/last.pt if present (default); --no-resume starts over, removing "
                        "the earlier run's checkpoints")
    _add_quiet(s, "no progress bars")
    _add_config_args(s)
    s.set_defaults(func=cmd_train)


def _add_checkpoint_commands(sub) -> None:
    """evaluate, zeroshot, visualize: what is done with a trained checkpoint."""
    s = sub.add_parser("evaluate", help="Recall@K of a checkpoint under a protocol (val, val-full, karpathy-test)")
    s.add_argument("--checkpoint", required=True, help="RUN/best.pt (or last.pt) written by clipft train")
    s.add_argument("--data", required=True, help="dataset root or file (for Karpathy: the folder with train2014/ and val2014/)")
    _add_split_args(s)
    _add_val_data(s)
    s.add_argument("--out", help="metrics JSON path (default: metrics_<split>.json beside the checkpoint; "
                                 "the CSV goes beside it)")
    s.add_argument("--compare-zero-shot", metavar="MODEL",
                   help="also run the protocol on a full HF CLIP model (hub name or local dir), side by side")
    s.add_argument("--save-embeddings", nargs="?", const="auto", metavar="PATH",
                   help="write the split's embeddings as safetensors (default PATH: "
                        "embeddings_<split>.safetensors beside the checkpoint)")
    _add_device(s)
    _add_quiet(s)
    _add_overrides(s, "override the checkpoint's saved config")
    s.set_defaults(func=cmd_evaluate)

    s = sub.add_parser("zeroshot", help="zero-shot classification with class-name prompts")
    s.add_argument("--checkpoint", required=True, help="RUN/best.pt (or last.pt) written by clipft train")
    s.add_argument("--labels", nargs="+", metavar="NAME", help="class names (with --image: required; with "
                                                             "--data: restricts the label source's classes)")
    s.add_argument("--image", nargs="+", metavar="PATH", help="classify these image files")
    s.add_argument("--data", help="classify a labelled split of this dataset root")
    _add_split_args(s)
    s.add_argument("--labels-from", metavar="SOURCE",
                   help="ground truth: shapes (colour + shape of the largest object), shapes:shape, shapes:color, "
                        "or a COCO instances_<split>2014.json (category of the largest annotation)")
    s.add_argument("--template", action="append", metavar="TEXT",
                   help='prompt template with {} for the class name, repeatable (default: eval.zeroshot_templates, '
                        'e.g. "a photo of a {}.")')
    s.add_argument("--top-k", type=positive_int, default=5, help="classes printed per --image (default 5)")
    s.add_argument("--plot", metavar="PNG", help="with --image: the images beside their probability bars")
    s.add_argument("--out", metavar="DIR", help="with --data: output folder (default: the checkpoint's folder)")
    s.add_argument("--examples", type=non_negative_int, default=6,
                   help="images in the examples picture, 0 = none (default 6)")
    s.add_argument("--seed", type=non_negative_int, default=0, help="which images the examples picture shows "
                                                                     "(default 0)")
    _add_device(s)
    _add_quiet(s)
    _add_overrides(s, "override the checkpoint's saved config (data and eval keys)")
    s.set_defaults(func=cmd_zeroshot)

    s = sub.add_parser("visualize", help="retrieval / zero-shot / heatmap / training-curve pictures (PNG)")
    s.add_argument("kind", choices=["text-to-image", "image-to-text", "heatmap", "zero-shot", "curves", "all"],
                   help="which picture (all: every kind but curves)")
    s.add_argument("--checkpoint", help="trained checkpoint (all kinds but curves)")
    s.add_argument("--data", help="dataset root (all kinds but curves)")
    s.add_argument("--run", help="run directory (curves)")
    _add_split_args(s)
    s.add_argument("--queries", nargs="+", metavar="TEXT",
                   help="text-to-image: free-text queries (default: random captions of the split)")
    s.add_argument("--n", type=positive_int, default=4, help="rows per picture: queries / images (zero-shot: 2 images "
                                                    "per row) (default 4)")
    s.add_argument("--heatmap-images", type=int_range(2, 100), default=10, help="images in the heatmap (default 10)")
    s.add_argument("--labels", nargs="+", metavar="NAME", help="zero-shot: class names")
    s.add_argument("--labels-from", metavar="SOURCE", help="zero-shot: ground truth (default shapes)")
    s.add_argument("--template", action="append", metavar="TEXT", help="zero-shot: prompt template(s)")
    s.add_argument("--embeddings", metavar="FILE", help="reuse a file written by evaluate --save-embeddings "
                   "(the images are not embedded again; --checkpoint and --data are still needed)")
    s.add_argument("--seed", type=non_negative_int, default=0, help="which random captions/images are shown "
                                                                     "(default 0)")
    s.add_argument("--out", help="PNG path (for all and zero-shot: a folder); default: the checkpoint's folder")
    _add_device(s)
    _add_quiet(s)
    _add_overrides(s, "override the checkpoint's saved config (data and eval keys)")
    s.set_defaults(func=cmd_visualize)


def _interrupted_note(args: argparse.Namespace) -> str:
    """What Ctrl-C left behind, for the command that was running."""
    cmd, out = getattr(args, "command", None), getattr(args, "out", None)
    if cmd == "train":
        if out and (Path(out) / "last.pt").is_file():
            return (f"the last checkpoint (an epoch end, or train.checkpoint_every) is {Path(out) / 'last.pt'}: "
                    "rerun the same command to resume")
        return "stopped before the first epoch finished: no checkpoint yet (finished caption caches are kept)"
    return {
        "cache-text": "the splits reported above are cached; a partly embedded split is not: rerun to finish",
        "prepare-images": "finished chunks are kept: rerun the same command to resume",
        "download": "partial downloads are kept: rerun the same command to resume",
        "ablate": "finished runs are kept: rerun the same command to resume the study",
        "demo": "finished steps and epochs are kept: rerun the same command to resume",
        "validate": "no report was written",
        "evaluate": "no metrics were written (finished caption caches are kept)",
    }.get(cmd, "nothing was saved by the step that was running")


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    # huggingface_hub prints through a handler of its own AND propagates to ours: every warning
    # appeared twice. Its own handler stays (transformers already does this for its logger).
    logging.getLogger("huggingface_hub").propagate = False
    # PyTorch repeats "This DataLoader will create N worker processes ..." for every loader; the
    # worker count is capped at the CPUs available instead (runtime.worker_count).
    warnings.filterwarnings("once", message=r"This DataLoader will create")


def main(argv: list[str] | None = None) -> int:
    from ..train.commandlog import record_command, run_dir_of
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    debug = "--debug" in argv  # accepted anywhere on the line, not only before the command
    args, extra = parser.parse_known_args([a for a in argv if a != "--debug"])
    args.argv = argv
    _configure_logging(args.verbose)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # PyTorch's CPU allocator asks for transparent huge pages for buffers >= 2 MB: a 128-image float
    # batch is 77 MB, and faulting it in 4 KB pages costs more than normalising it (torch reads the
    # variable at allocation time; DataLoader workers inherit it).
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    code = 1  # an unexpected exception propagates with this status in RUN/commands.txt
    try:
        args.extra_overrides = _split_extra(extra, getattr(args, "command", None))
        _check_inputs_exist(args)
        _check_outputs(args)
        check_cuda_present(getattr(args, "device", None))
        _check_config_early(args)
        # After the cheap checks (a mistake answers at once), before torch is imported: threads = the CPUs
        # other processes leave, threads that wait sleep (clipft.threads; docs/measurements.md).
        from ..threads import configure_cpu_threads
        configure_cpu_threads()
        code = args.func(args)
        return code
    except KeyboardInterrupt:
        print(f"clipft: interrupted: {_interrupted_note(args)}", file=sys.stderr)
        code = 130
        return code
    except Exception as e:  # noqa: BLE001 - the one place that turns a surprise into one line
        if debug:
            raise
        if _is_expected(e):  # one line; Preempted: its own line and 128 + signal (requeue)
            print(getattr(e, "line", f"clipft: error: {e}"), file=sys.stderr)
            code = getattr(e, "exit_code", EXIT_USAGE)
            return code
        where = f"{args.command}: " if getattr(args, "command", None) else ""
        text = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        print(f"clipft: error: {where}unexpected {type(e).__name__}{': ' + text if text else ''} "
              "(run with --debug for the traceback)", file=sys.stderr)
        code = EXIT_UNEXPECTED
        return code
    finally:
        if run_dir_of(args) is not None and not getattr(args, "command_recorded", False):  # how the run was made: RUN/commands.txt (see clipft.train.commandlog)
            record_command(run_dir_of(args), argv, code)


if __name__ == "__main__":
    sys.exit(main())
