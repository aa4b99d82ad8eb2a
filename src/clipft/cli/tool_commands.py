"""The tool commands: inspect-data, report, download, ablate and demo (their parsers and what they run).
Each imports its library module when it runs, so that parsing imports no torch."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..config import PRESETS, ConfigError
from .args import _add_config_args, _add_device, _add_overrides, _add_quiet, _build_config, int_range, non_negative_int


def cmd_inspect_data(args: argparse.Namespace) -> int:
    from ..eval.pictures import write_data_samples
    out = Path(args.out) if args.out else Path(f"data_samples_{args.split}.png")
    data, samples, out = write_data_samples(args.data, args.split, _build_config(args), out, n=args.n,
                                            seed=args.seed)
    for s in samples:
        print(f"{s['image_id']}: {s['path']}")
        for c in s["captions"]:
            print(f"    {c}")
    print(f"{len(data)} images, {len(data.caption_ids)} captions; wrote {out}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from ..report import make_report
    from ..report import check_run_dir
    check_run_dir(args.run)  # a dataset folder or a typo: one line, not a report of blanks
    r = make_report(args.run, data=args.data, notes=args.notes, ablation=args.ablation, compare=args.compare or (),
                    html=args.html, pdf=args.pdf, complete=not args.no_draw, device=args.device, seed=args.seed,
                    progress=not args.quiet)
    if r["drawn"]:
        print(f"drew {', '.join(r['drawn'])}")
    for section, how in r["missing"].items():
        print(f"missing {section}: {how}")
    for key in ("md", "html", "pdf"):
        if r[key]:
            print(f"wrote {r[key]}")
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    from ..data.download import download_coco, next_steps
    if args.source == "kaggle" or args.dataset != "coco":
        return _download_kaggle(args)
    results = download_coco(args.out, splits=args.splits, karpathy=args.karpathy, mirror=args.mirror,
                            keep_archives=args.keep_archives, retries=args.retries, progress=not args.quiet)
    for r in results:
        print(f"{r['archive']}: {r['status']} -> {', '.join(r['targets'])}")
    print("\n".join(next_steps(args.out)))
    return 0


def _download_kaggle(args: argparse.Namespace) -> int:
    """download ... --source kaggle (and Flickr's Karpathy file); the official Flickr images need a form."""
    from ..data.download import COCO_ARCHIVES, DownloadError, download_coco, karpathy_archive, next_steps
    from ..data.kaggle import download_kaggle, official_flickr_message
    if args.source != "kaggle" and not args.karpathy:
        raise DownloadError(official_flickr_message(args.dataset, args.out))
    if args.source == "kaggle":
        r = download_kaggle(args.dataset, args.out)
        print(f"{r['handle']}: {r['source']} -> {len(r['linked'])} new link(s) in {r['root']}")
    if args.karpathy:  # Karpathy's split file from caption_datasets.zip: the published train/val/test
        split_file = "dataset_coco.json" if args.dataset == "coco" else f"dataset_{args.dataset}.json"
        download_coco(args.out, splits=(), karpathy=True, mirror=args.mirror, retries=args.retries,
                      progress=not args.quiet, archives={**COCO_ARCHIVES, "karpathy": karpathy_archive(split_file)})
        print(f"Karpathy split file: {Path(args.out) / split_file}")
    if args.source != "kaggle":
        print(official_flickr_message(args.dataset, args.out))
    print("\n".join(next_steps(args.out)) if args.dataset == "coco" else
          f"next:\n  clipft validate --data {args.out}\n  clipft train --data {args.out} --out runs/{args.dataset}")
    return 0


def cmd_ablate(args: argparse.Namespace) -> int:
    if not args.out and not args.list:  # before the import (torch): an argument mistake answers at once
        raise ConfigError("ablate: --out DIR is required (unless --list)")
    from .ablations import format_list, load_ablations_file, select_configs  # no torch: mistakes answer at once
    user = load_ablations_file(args.configs_file) if args.configs_file else None
    if args.list:
        print(format_list(user))
        return 0
    select_configs(args.configs, user, args.quick)  # an unknown name, before the study's imports
    from .ablate import run_study
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
    """The embedded end-to-end demo (see clipft.cli.demo); the library prints its six steps."""
    from ..train.commandlog import record_command
    from .demo import run_demo

    def record() -> None:  # before the report, so that its Reproduce section lists this command
        args.command_recorded = record_command(args.out, args.argv, 0)
    run_demo(args.out, args.data, train_images=args.train_images, val_images=args.val_images,
             overrides=list(args.overrides) + list(args.extra_overrides), progress=not args.quiet,
             resume=args.resume, before_report=record)
    return 0


# --------------------------------------------------------------------------- parsers

def _add_report_parser(sub) -> None:
    s = sub.add_parser("report", help="write RUN/report.md from a run directory, drawing what it lacks")
    s.add_argument("run", metavar="RUN", help="run directory: the --out folder of clipft train")
    s.add_argument("--data", help="the run's dataset, when it moved (default: summary.json's data_root, RUN/data)")
    s.add_argument("--notes", metavar="FILE.md", help="your own section (observations, LLM-usage reflection, "
                                                       "conversation link), included verbatim")
    s.add_argument("--ablation", metavar="DIR", help="add a `clipft ablate --out DIR` study: table and bar chart")
    s.add_argument("--compare", nargs="+", metavar="OTHER_RUN", help="add other runs' Recall@K and curves side by side")
    s.add_argument("--html", action="store_true", help="also write report.html (self-contained, print-friendly)")
    s.add_argument("--pdf", action="store_true", help="also write report.pdf (headless Chromium; implies --html)")
    s.add_argument("--no-draw", action="store_true", help="only the files already in RUN: draw nothing")
    s.add_argument("--seed", type=non_negative_int, default=0, help="seed of the random examples (default 0)")
    _add_device(s)
    _add_quiet(s)
    s.set_defaults(func=cmd_report)


def add_tool_commands(sub) -> None:
    """inspect-data, report, download, ablate, demo."""
    s = sub.add_parser("inspect-data", help="picture of random image-caption pairs (integrity check)")
    s.add_argument("--data", required=True, help="COCO root, CSV/TSV/JSONL file, or image folder")
    s.add_argument("--split", default="train", help="split to draw from (default train)")
    s.add_argument("--n", type=int_range(1, 64), default=6, help="image-caption pairs shown (default 6)")
    s.add_argument("--seed", type=non_negative_int, default=0, help="which pairs are drawn (default 0)")
    s.add_argument("--out", help="PNG path (default: data_samples_<split>.png in the current folder)")
    _add_config_args(s)
    s.set_defaults(func=cmd_inspect_data)

    _add_report_parser(sub)

    s = sub.add_parser("download", help="fetch MS COCO 2014 into the loader's layout (resumable, verified), "
                                        "or a Kaggle copy of COCO / Flickr8k / Flickr30k (--source kaggle)")
    s.add_argument("dataset", choices=["coco", "flickr8k", "flickr30k"], help="which dataset to fetch")
    s.add_argument("--source", choices=["official", "kaggle"], default="official",
                   help="official hosts (COCO only: the Flickr images need a request form), or the Kaggle copy "
                        "through kagglehub (pip install -e '.[kaggle]' in the source checkout)")
    s.add_argument("--out", required=True, help="dataset root (gets train2014/, val2014/, annotations/)")
    s.add_argument("--splits", nargs="*", choices=["train", "val", "annotations"],
                   default=["train", "val", "annotations"], help="archives to fetch (default: all three)")
    s.add_argument("--karpathy", action="store_true", help="also fetch Karpathy's split file -> OUT/dataset_coco.json "
                   "(flickr8k / flickr30k: OUT/dataset_flickr8k.json / dataset_flickr30k.json)")
    s.add_argument("--mirror", metavar="URL", help="base URL serving zips/train2014.zip, zips/val2014.zip, "
                   "annotations/annotations_trainval2014.zip, caption_datasets.zip (default: the official hosts)")
    s.add_argument("--keep-archives", action="store_true", help="keep the zips in OUT/downloads/ after extracting")
    s.add_argument("--retries", type=non_negative_int, default=3, help="resume a lost connection this many times (default 3)")
    _add_quiet(s, "no progress bars")
    s.set_defaults(func=cmd_download)

    s = sub.add_parser("ablate", help="ablation study: modifications vs the baseline, same data/seeds/budget")
    s.add_argument("--out", help="study directory (runs, ablation.md/.csv/.png); rerun to resume")
    s.add_argument("--data", help="dataset root (default: synthetic shapes generated in OUT/data)")
    s.add_argument("--configs", nargs="+", metavar="NAME",
                   help="configurations to compare (default: all; --quick: baseline batchnorm learnable_temp); "
                        "baseline is always included")
    s.add_argument("--configs-file", metavar="YAML", help="user configurations: name: {section: {key: value}}")
    s.add_argument("--seeds", nargs="+", type=non_negative_int, default=[0], help="train.seed values (default 0)")
    s.add_argument("--base-config", default="demo", metavar="FILE_OR_PRESET",
                   help="config every configuration starts from (default: the demo preset)")
    s.add_argument("--quick", action="store_true", help="small budget smoke study (baseline + two modifications)")
    s.add_argument("--list", action="store_true", help="list the configurations and exit")
    _add_quiet(s, "no progress bars")
    _add_overrides(s, "override the base config for every run (repeatable)")
    s.set_defaults(func=cmd_ablate)

    s = sub.add_parser("demo", help="embedded end-to-end demo on synthetic data, CPU, offline")
    s.add_argument("--out", default="runs/demo", help="run directory (default: runs/demo); a rerun resumes it")
    s.add_argument("--data", help="dataset dir (default: OUT/data, generated if absent)")
    s.add_argument("--train-images", type=int_range(2), default=PRESETS["demo"]["data"]["train_images"],
                   help=f"training images (default {PRESETS['demo']['data']['train_images']})")
    s.add_argument("--val-images", type=int_range(2), default=PRESETS["demo"]["data"]["val_images"],
                   help=f"validation images choosing best.pt; as many again are held out for the figures "
                        f"(default {PRESETS['demo']['data']['val_images']})")
    s.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                   help="continue the run already in OUT (default); --no-resume trains it again from scratch")
    _add_quiet(s)
    _add_overrides(s, "override the demo preset (repeatable)")
    s.set_defaults(func=cmd_demo)
