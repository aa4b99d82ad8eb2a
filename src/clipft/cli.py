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
    from .model import ModelError
    from .text import TextEncoderError
    from .train import TrainingError
    return (ConfigError, DataError, ModelError, TextEncoderError, TrainingError)


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


def cmd_cache_text(args: argparse.Namespace) -> int:
    from .data import load_split
    from .runtime import resolve_device
    from .text import get_text_embeddings, text_cache_path
    cfg = _build_config(args)
    if args.text_encoder:
        cfg.text.encoder = args.text_encoder
    root = Path(args.data)
    device = resolve_device(args.device)
    for split in args.split:
        data = load_split(root, split, cfg.data)
        cache_dir = Path(cfg.text.cache_dir) if cfg.text.cache_dir else root / "cache"
        emb, info = get_text_embeddings(data.captions, cfg.text.encoder, text_cache_path(cache_dir, split, cfg.text.encoder),
                                        device=device, batch_size=cfg.text.batch_size,
                                        max_length=cfg.text.max_length, on_mismatch=cfg.text.on_mismatch)
        state = f"built in {info['seconds']:.1f}s" if info["built"] else "up to date (fingerprint matches)"
        print(f"{split}: {emb.shape[0]} captions x {emb.shape[1]} dims -> {info['path']} ({state})")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .train import resolve_run_config, train
    overrides = list(args.overrides) + list(args.extra_overrides)
    base = preset_config(args.config) if args.config in PRESETS and not Path(args.config).exists() else None
    cfg_file = None if base is not None else args.config
    cfg = resolve_run_config(args.out, cfg_file, overrides, base=base, resume=args.resume)
    summary = train(cfg, args.data, args.out, resume=args.resume, progress=not args.quiet)
    print(f"done: {summary['epochs']} epochs, best mean R@5 {summary['best_mean_R@5']:.2f}% "
          f"(epoch {summary['best_epoch']}); checkpoints in {args.out}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .config import from_dict
    from .evaluate import evaluate_checkpoint, format_recall_table
    from .model import read_checkpoint
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


def cmd_ablate(args: argparse.Namespace) -> int:
    from .ablate import format_list, load_ablations_file, run_study
    if args.list:
        print(format_list(load_ablations_file(args.configs_file) if args.configs_file else None))
        return 0
    if not args.out:
        raise ConfigError("ablate: --out DIR is required (unless --list)")
    study = run_study(args.out, data_root=args.data, names=args.configs, seeds=args.seeds,
                      base_config=args.base_config, overrides=list(args.overrides) + list(args.extra_overrides),
                      configs_file=args.configs_file, quick=args.quick, progress=not args.quiet)
    out = Path(args.out)
    print((out / "ablation.md").read_text().split("\n\nHow to read it:")[0].split("\n\n", 1)[-1])
    n_ok = sum(r["status"] == "ok" for r in study["runs"])
    print(f"{n_ok}/{len(study['runs'])} runs ok; wrote {out / 'ablation.md'}, {out / 'ablation.csv'}, "
          f"{out / 'ablation_recall.png'}, {out / 'ablation_curves.png'}")
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
    _add_config_args(s)
    s.set_defaults(func=cmd_cache_text)

    s = sub.add_parser("train", help="train the image tower (resumes a run already in --out)")
    s.add_argument("--data", required=True, help="dataset root (COCO 2014 layout)")
    s.add_argument("--out", required=True, help="run directory")
    s.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                   help="continue from OUT/last.pt if present (default); --no-resume starts over")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_config_args(s)
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("evaluate", help="Recall@K of a checkpoint on a split")
    s.add_argument("--checkpoint", required=True)
    s.add_argument("--data", required=True)
    s.add_argument("--split", default="val")
    s.add_argument("--out", help="metrics JSON path (default: metrics.json beside the checkpoint)")
    s.add_argument("--device", default="auto")
    s.add_argument("--quiet", action="store_true")
    s.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override the checkpoint's saved config (e.g. data.val_images=0 for the full split)")
    s.set_defaults(func=cmd_evaluate)

    s = sub.add_parser("report", help="write RUN/report.md from a run directory")
    s.add_argument("run")
    s.set_defaults(func=cmd_report)

    s = sub.add_parser("ablate", help="ablation study: modifications vs the baseline, same data/seeds/budget")
    s.add_argument("--out", help="study directory (runs, ablation.md/.csv/.png); rerun to resume")
    s.add_argument("--data", help="dataset root (default: synthetic shapes generated in OUT/data)")
    s.add_argument("--configs", nargs="+", metavar="NAME",
                   help="configurations to compare (default: all; --quick: baseline batchnorm learnable_temp); "
                        "baseline is always included")
    s.add_argument("--configs-file", metavar="YAML", help="user configurations: name: {section: {key: value}}")
    s.add_argument("--seeds", nargs="+", type=int, default=[0], help="train.seed values (default 0)")
    s.add_argument("--base-config", default="demo", metavar="FILE_OR_PRESET",
                   help="config every configuration starts from (default: the demo preset)")
    s.add_argument("--quick", action="store_true", help="small budget smoke study (baseline + two modifications)")
    s.add_argument("--list", action="store_true", help="list the configurations and exit")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    s.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override the base config for every run (repeatable)")
    s.set_defaults(func=cmd_ablate)

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
