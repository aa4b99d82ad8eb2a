"""Command line: the only place that parses argv. Every command calls a library function.

Expected failures (bad data, bad config, missing model, diverged run) print one line
`clipft: error: ...` and exit 2, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from .config import PRESETS, Config, ConfigError, load_config, preset_config

EXIT_USAGE = 2


def _expected_errors() -> tuple[type[BaseException], ...]:
    from .data import DataError
    from .distributed import DistributedError
    from .download import DownloadError
    from .model import ModelError
    from .text import TextEncoderError
    from .train import TrainingError
    return (ConfigError, DataError, DistributedError, DownloadError, ModelError, TextEncoderError, TrainingError)


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help=f"YAML config file, or a preset name ({', '.join(PRESETS)})")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value (repeatable); --section.key=value works too")


def _build_config(args: argparse.Namespace, base: Config | None = None) -> Config:
    """Preset/file then overrides (including bare --section.key=value arguments)."""
    overrides = list(args.overrides) + list(getattr(args, "extra_overrides", []))
    cfg_arg = getattr(args, "config", None)
    if cfg_arg and cfg_arg in PRESETS and not Path(cfg_arg).exists():
        return load_config(None, overrides, base=preset_config(cfg_arg))
    return load_config(cfg_arg, overrides, base=base)


def _split_extra(extra: list[str]) -> list[str]:
    """Turn leftover `--section.key=value` / `--section.key value` args into override strings."""
    out, i = [], 0
    while i < len(extra):
        a = extra[i]
        if not a.startswith("--") or "." not in a.split("=", 1)[0]:
            raise ConfigError(f"unrecognised argument {a!r}")
        if "=" in a:
            out.append(a[2:])
            i += 1
        elif i + 1 < len(extra):
            out.append(f"{a[2:]}={extra[i + 1]}")
            i += 2
        else:
            raise ConfigError(f"{a}: missing value")
    return out


# --------------------------------------------------------------------------- commands

def cmd_make_data(args: argparse.Namespace) -> int:
    from .shapes import make_shapes_dataset
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
    from .data import load_split, text_cache_file
    from .runtime import resolve_device
    from .text import get_text_embeddings
    _val_data_override(args)
    cfg = _build_config(args)
    if args.text_encoder:
        cfg.text.encoder = args.text_encoder
    root = Path(args.data)
    device = resolve_device(args.device)
    for split in args.split:
        data = load_split(root, split, cfg.data)
        emb, info = get_text_embeddings(data.captions, cfg.text.encoder, text_cache_file(root, split, cfg),
                                        device=device, batch_size=cfg.text.batch_size,
                                        max_length=cfg.text.max_length, on_mismatch=cfg.text.on_mismatch)
        state = f"built in {info['seconds']:.1f}s" if info["built"] else "up to date (fingerprint matches)"
        print(f"{split}: {emb.shape[0]} captions x {emb.shape[1]} dims -> {info['path']} ({state})")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from .validate import default_report_path, format_report, validate_data, write_report_json
    cfg = _build_config(args)
    if args.text_encoder:
        cfg.text.encoder = args.text_encoder
    report = validate_data(args.data, cfg, val_data=args.val_data, check_tokens=not args.no_tokens,
                           progress=not args.quiet)
    print(format_report(report))
    out = write_report_json(report, args.out or default_report_path(args.data))
    print(f"wrote {out}")
    return 0 if report["ok"] else 1


def cmd_prepare_images(args: argparse.Namespace) -> int:
    from .data import cache_location, load_split
    from .prepare import prepare_images, prepared_dir
    _val_data_override(args)
    cfg = _build_config(args)
    root = Path(args.data)
    for split in args.split:
        data = load_split(root, split, cfg.data)
        cache_dir, name = cache_location(root, split, cfg)  # COCO: (ROOT/cache, split)
        out = prepared_dir(cache_dir, name, args.size)
        info = prepare_images(data, out, size=args.size, workers=args.workers, progress=not args.quiet)
        print(f"{split}: {info['images']} images ({info['bad']} unreadable, skipped) -> {out} "
              f"in {info['seconds']:.1f}s")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Also the entry point of every process under `torchrun ... -m clipft train` (see distributed.py)."""
    from .distributed import is_main
    from .train import resolve_run_config, train
    _val_data_override(args)
    overrides = list(args.overrides) + list(args.extra_overrides)
    base = preset_config(args.config) if args.config in PRESETS and not Path(args.config).exists() else None
    cfg_file = None if base is not None else args.config
    cfg = resolve_run_config(args.out, cfg_file, overrides, base=base, resume=args.resume)
    summary = train(cfg, args.data, args.out, resume=args.resume, progress=not args.quiet)
    if not is_main():  # under torchrun: one line per job, from rank 0
        return 0
    print(f"done: {summary['epochs']} epochs, best mean R@5 {summary['best_mean_R@5']:.2f}% "
          f"(epoch {summary['best_epoch']}); checkpoints in {args.out}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .config import from_dict
    from .evaluate import evaluate_checkpoint, format_recall_table
    from .model import read_checkpoint
    _val_data_override(args)
    cfg = None
    if args.overrides or args.extra_overrides:
        cfg = from_dict(read_checkpoint(args.checkpoint)["config"])
        cfg = load_config(None, list(args.overrides) + list(args.extra_overrides), base=cfg)
    out = args.out or str(Path(args.checkpoint).parent / "metrics.json")
    m = evaluate_checkpoint(args.checkpoint, args.data, split=args.split, cfg=cfg, out=out,
                            device=args.device, progress=not args.quiet)
    print(f"{m['protocol']}")
    print(format_recall_table(m))
    print(f"wrote {out}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report import write_report
    print(f"wrote {write_report(args.run)}")
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    from .download import download_coco, next_steps
    results = download_coco(args.out, splits=args.splits, karpathy=args.karpathy, mirror=args.mirror,
                            keep_archives=args.keep_archives, retries=args.retries, progress=not args.quiet)
    for r in results:
        print(f"{r['archive']}: {r['status']} -> {', '.join(r['targets'])}")
    print("\n".join(next_steps(args.out)))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The embedded end-to-end demo: shapes data -> MiniLM text cache -> train -> evaluate -> report."""
    from .evaluate import evaluate_checkpoint, format_recall_table
    from .report import write_report
    from .shapes import make_shapes_dataset
    from .train import resolve_run_config, train

    out = Path(args.out)
    data = Path(args.data) if args.data else out / "data"
    if not (data / "annotations" / "captions_val2014.json").is_file():
        print(f"[1/4] writing the synthetic shapes dataset to {data}")
        make_shapes_dataset(data, n_train=args.train_images, n_val=args.val_images, seed=0)
    else:
        print(f"[1/4] using the dataset already in {data}")
    cfg = resolve_run_config(out, None, list(args.overrides) + list(args.extra_overrides),
                             base=preset_config("demo"), resume=True)
    print(f"[2/4] training {cfg.model.backbone} against frozen {cfg.text.encoder} for {cfg.train.epochs} epochs")
    train(cfg, data, out, resume=True, progress=not args.quiet)
    print("[3/4] evaluating best.pt on the validation split")
    m = evaluate_checkpoint(out / "best.pt", data, split=cfg.data.val_split, out=out / "metrics.json",
                            progress=not args.quiet)
    print(m["protocol"])
    print(format_recall_table(m))
    print(f"[4/4] wrote {write_report(out)}")
    return 0


# --------------------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="clipft", description=__doc__.splitlines()[0])
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("make-data", help="write a synthetic dataset in COCO 2014 layout")
    s.add_argument("kind", choices=["shapes"])
    s.add_argument("--out", required=True)
    s.add_argument("--train", type=int, default=2000, help="train images (default 2000)")
    s.add_argument("--val", type=int, default=500, help="val images (default 500)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--image-size", type=int, default=128)
    s.set_defaults(func=cmd_make_data)

    s = sub.add_parser("cache-text", help="embed every caption of a split once with the frozen text encoder")
    s.add_argument("--data", required=True)
    s.add_argument("--split", nargs="+", default=["train", "val"])
    s.add_argument("--text-encoder", help="HF name or local dir (default: text.encoder of the config)")
    s.add_argument("--device", default="auto")
    _add_val_data(s)
    _add_config_args(s)
    s.set_defaults(func=cmd_cache_text)

    s = sub.add_parser("validate", help="check a dataset before training (report printed and written as JSON; "
                                        "exit 1 if training would be spoiled)")
    s.add_argument("--data", required=True, help="COCO root, CSV/TSV/JSONL file, or image folder")
    _add_val_data(s)
    s.add_argument("--out", help="report JSON (default: DATA/validate_report.json, or <stem>.validate.json "
                                 "beside a data file)")
    s.add_argument("--text-encoder", help="tokenizer for the token-length check (default: text.encoder)")
    s.add_argument("--no-tokens", action="store_true", help="skip the token-length check (no text encoder load)")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_config_args(s)
    s.set_defaults(func=cmd_validate)

    s = sub.add_parser("prepare-images", help="decode every image once into a uint8 cache that training reads")
    s.add_argument("--data", required=True)
    _add_val_data(s)
    s.add_argument("--split", nargs="+", default=["train", "val"])
    s.add_argument("--size", type=int, default=256, help="stored square side (short side resized, centre kept)")
    s.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    s.add_argument("--quiet", action="store_true")
    _add_config_args(s)
    s.set_defaults(func=cmd_prepare_images)

    s = sub.add_parser("train", help="train the image tower (resumes a run already in --out)")
    s.add_argument("--data", required=True, help="COCO root, CSV/TSV/JSONL file, or image folder")
    _add_val_data(s)
    s.add_argument("--out", required=True, help="run directory")
    s.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                   help="continue from OUT/last.pt if present (default); --no-resume starts over")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_config_args(s)
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("evaluate", help="Recall@K of a checkpoint on a split")
    s.add_argument("--checkpoint", required=True)
    s.add_argument("--data", required=True)
    s.add_argument("--split", default="val", help="split name (CSV/JSONL/folder data: train, val or all)")
    _add_val_data(s)
    s.add_argument("--out", help="metrics JSON path (default: metrics.json beside the checkpoint)")
    s.add_argument("--device", default="auto")
    s.add_argument("--quiet", action="store_true")
    s.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override the checkpoint's saved config (e.g. data.val_images=0 for the full split)")
    s.set_defaults(func=cmd_evaluate)

    s = sub.add_parser("report", help="write RUN/report.md from a run directory")
    s.add_argument("run")
    s.set_defaults(func=cmd_report)

    s = sub.add_parser("download", help="fetch MS COCO 2014 into the loader's layout (resumable, verified)")
    s.add_argument("dataset", choices=["coco"])
    s.add_argument("--out", required=True, help="dataset root (gets train2014/, val2014/, annotations/)")
    s.add_argument("--splits", nargs="*", choices=["train", "val", "annotations"],
                   default=["train", "val", "annotations"], help="archives to fetch (default: all three)")
    s.add_argument("--karpathy", action="store_true", help="also fetch Karpathy's split file -> OUT/dataset_coco.json")
    s.add_argument("--mirror", metavar="URL", help="base URL serving zips/train2014.zip, zips/val2014.zip, "
                   "annotations/annotations_trainval2014.zip, caption_datasets.zip (default: the official hosts)")
    s.add_argument("--keep-archives", action="store_true", help="keep the zips in OUT/downloads/ after extracting")
    s.add_argument("--retries", type=int, default=3, help="resume a lost connection this many times (default 3)")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    s.set_defaults(func=cmd_download)

    s = sub.add_parser("demo", help="embedded end-to-end demo on synthetic data, CPU, offline")
    s.add_argument("--out", default="runs/demo")
    s.add_argument("--data", help="dataset dir (default: OUT/data, generated if absent)")
    s.add_argument("--train-images", type=int, default=PRESETS["demo"]["data"]["train_images"])
    s.add_argument("--val-images", type=int, default=PRESETS["demo"]["data"]["val_images"])
    s.add_argument("--quiet", action="store_true")
    s.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    s.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        args.extra_overrides = _split_extra(extra)
        return args.func(args)
    except _expected_errors() as e:
        print(f"clipft: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("clipft: interrupted (the last completed checkpoint is intact)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
