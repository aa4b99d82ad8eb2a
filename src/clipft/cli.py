"""Command line: the only place that parses argv. Every command calls a library function.

Expected failures (bad data, bad config, missing model, diverged run) print one line
`clipft: error: ...` and exit 2, without a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from .config import PRESETS, Config, ConfigError, load_config, preset_config

EXIT_USAGE = 2


def _expected_errors() -> tuple[type[BaseException], ...]:
    from .data import DataError
    from .distributed import DistributedError
    from .data.download import DownloadError
    from .evaluate import EvaluationError
    from .model import ModelError
    from .report import ReportError
    from .search.index import SearchError
    from .preempt import Preempted
    from .runlock import RunInUseError
    from .text import TextEncoderError
    from .train import TrainingError
    return (ConfigError, DataError, DistributedError, DownloadError, EvaluationError, ModelError, ReportError,
            SearchError, TextEncoderError, TrainingError, RunInUseError, Preempted)


# --------------------------------------------------------------------------- shared argument groups

def _add_overrides(p: argparse.ArgumentParser, help: str | None = None) -> None:
    """--set SECTION.KEY=VALUE (repeatable); leftover --section.key=value arguments join them in main."""
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE", help=help)


def _add_config_args(p: argparse.ArgumentParser) -> None:
    """--config FILE_OR_PRESET and --set: the config of commands that build one."""
    p.add_argument("--config", help=f"YAML config file, or a preset name ({', '.join(PRESETS)})")
    _add_overrides(p, "override one config value (repeatable); --section.key=value works too")


def _add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto")


def _add_quiet(p: argparse.ArgumentParser, help: str | None = None) -> None:
    p.add_argument("--quiet", action="store_true", help=help)


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


def _add_split_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--split", default="val",
                   help="protocol: val (the configured subset, default), val-full (whole val2014), val-heldout "
                        "(validation images outside the subset that chose best.pt), "
                        "karpathy-test / karpathy-val (with --karpathy), or any split name")
    p.add_argument("--karpathy", metavar="JSON", help="Karpathy's dataset_coco.json (for --split karpathy-test)")


# --------------------------------------------------------------------------- commands

def cmd_make_data(args: argparse.Namespace) -> int:
    from .data.shapes import make_shapes_dataset
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
                                        max_length=cfg.text.max_length, on_mismatch=cfg.text.on_mismatch,
                                        amp=cfg.train.amp)
        state = f"built in {info['seconds']:.1f}s" if info["built"] else "up to date (fingerprint matches)"
        print(f"{split}: {emb.shape[0]} captions x {emb.shape[1]} dims -> {info['path']} ({state})")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from .data.validate import default_report_path, format_report, validate_data, write_report_json
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
    from .data.prepare import prepare_split
    _val_data_override(args)
    cfg = _build_config(args)
    for split in args.split:
        info = prepare_split(args.data, split, cfg, size=args.size, workers=args.workers, progress=not args.quiet)
        print(f"{split}: {info['images']} images ({info['bad']} unreadable, skipped) -> {info['path']} "
              f"in {info['seconds']:.1f}s")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Also the entry point of every process under `torchrun ... -m clipft train` (see distributed.py)."""
    from .distributed import is_main
    from .runfiles import resolve_run_config
    from .train import train
    _val_data_override(args)
    overrides = list(args.overrides) + list(args.extra_overrides)
    base = preset_config(args.config) if args.config in PRESETS and not Path(args.config).exists() else None
    cfg_file = None if base is not None else args.config
    cfg = resolve_run_config(args.out, cfg_file, overrides, base=base, resume=args.resume)
    try:
        summary = train(cfg, args.data, args.out, resume=args.resume, progress=not args.quiet)
    except RuntimeError as e:  # torch.OutOfMemoryError is one too
        from .chunked import out_of_memory_advice
        from .runtime import is_out_of_memory
        from .train import TrainingError
        if not is_out_of_memory(e):
            raise
        last = Path(args.out) / "last.pt"
        kept = f"; {last} is intact (rerun with the setting to resume from it)" if last.is_file() else ""
        raise TrainingError(out_of_memory_advice(cfg.train.batch_size, cfg.train.embed_chunk) + kept) from None
    if not is_main():  # under torchrun: one line per job, from rank 0
        return 0
    print(f"done: {summary['epochs']} epochs, best mean R@5 {summary['best_mean_R@5']:.2f}% "
          f"(epoch {summary['best_epoch']}); checkpoints in {args.out}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluate import evaluate_checkpoint, format_comparison_table, format_recall_table
    _val_data_override(args)
    cfg = _checkpoint_config(args)
    save = args.save_embeddings
    if save == "auto":
        save = str(Path(args.checkpoint).parent / f"embeddings_{args.split}.safetensors")
    m = evaluate_checkpoint(args.checkpoint, args.data, split=args.split, cfg=cfg, out=args.out,
                            device=args.device, progress=not args.quiet, karpathy=args.karpathy,
                            compare_zero_shot=args.compare_zero_shot, save_embeddings=save)
    print(f"{m['protocol']}")
    print(format_comparison_table(m) if "zero_shot" in m else format_recall_table(m))
    if m.get("skipped_images"):
        print(f"{m['skipped_images']} unreadable image(s) left out (with their captions)")
    for f in m["files"] + ([m["embeddings"]] if "embeddings" in m else []):
        print(f"wrote {f}")
    return 0


def _checkpoint_config(args: argparse.Namespace) -> Config | None:
    """The checkpoint's saved config with --set overrides applied (None without overrides)."""
    from .config import from_dict
    from .model import read_checkpoint
    overrides = list(getattr(args, "overrides", [])) + list(getattr(args, "extra_overrides", []))
    if not overrides:
        return None
    return load_config(None, overrides, base=from_dict(read_checkpoint(args.checkpoint)["config"]))


def cmd_zeroshot(args: argparse.Namespace) -> int:
    from .zeroshot import zeroshot_dataset, zeroshot_images
    if bool(args.image) == bool(args.data):
        raise ConfigError("zeroshot: give either --image PATH ... or --data ROOT")
    if args.image:
        if not args.labels:
            raise ConfigError("zeroshot --image: give the class names with --labels")
        results = zeroshot_images(args.checkpoint, args.image, args.labels, templates=args.template,
                                  device=args.device, k=args.top_k, plot=args.plot)
        for r in results:
            print(r["path"])
            for label, p in r["top"]:
                print(f"  {p:6.3f}  {label}")
        if args.plot:
            print(f"wrote {args.plot}")
        return 0
    if not args.labels_from:
        raise ConfigError("zeroshot --data: say where the ground truth comes from with --labels-from "
                          "(shapes, shapes:shape, shapes:color, or a COCO instances_*.json)")
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
        from .runfiles import plot_run_curves
        if not args.run:
            raise ConfigError("visualize curves: give the run directory with --run RUN")
        print(f"wrote {plot_run_curves(args.run, args.out)}")
        return 0
    if not args.checkpoint or not args.data:
        raise ConfigError(f"visualize {args.kind}: needs --checkpoint CKPT and --data ROOT")
    from .pictures import write_visualization
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


def cmd_inspect_data(args: argparse.Namespace) -> int:
    from .pictures import write_data_samples
    out = Path(args.out) if args.out else Path(f"data_samples_{args.split}.png")
    data, samples = write_data_samples(args.data, args.split, _build_config(args), out, n=args.n, seed=args.seed)
    for s in samples:
        print(f"{s['image_id']}: {s['path']}")
        for c in s["captions"]:
            print(f"    {c}")
    print(f"{len(data)} images, {len(data.caption_ids)} captions; wrote {out}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report import make_report
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
    from .data.download import download_coco, next_steps
    results = download_coco(args.out, splits=args.splits, karpathy=args.karpathy, mirror=args.mirror,
                            keep_archives=args.keep_archives, retries=args.retries, progress=not args.quiet)
    for r in results:
        print(f"{r['archive']}: {r['status']} -> {', '.join(r['targets'])}")
    print("\n".join(next_steps(args.out)))
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
    """The embedded end-to-end demo (see clipft.demo); the library prints its six steps."""
    from .demo import run_demo
    run_demo(args.out, args.data, train_images=args.train_images, val_images=args.val_images,
             overrides=list(args.overrides) + list(args.extra_overrides), progress=not args.quiet)
    return 0


# --------------------------------------------------------------------------- search your photos

def cmd_index(args: argparse.Namespace) -> int:
    from .api import load
    from .search.index import default_index_dir, update_index
    from .search.query import model_source, refresh_ann
    index_dir = Path(args.index) if args.index else default_index_dir(args.folder)
    model = load(args.model, device=args.device)
    s = update_index(args.folder, model, index_dir, model_source=model_source(args.model), rebuild=args.rebuild,
                     dtype=args.dtype, batch_size=args.batch_size, workers=args.workers, progress=not args.quiet)
    print(f"{index_dir}: {s.summary()}")
    if (ann := refresh_ann(index_dir, force=args.ann)) is not None:
        print(f"approximate index (faiss IVF) up to date: {ann}")
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    import json
    from .search import query as Q
    if sum(map(bool, (args.query, args.image, args.duplicates))) != 1:
        raise ConfigError("search: give one of QUERY, --image PATH or --duplicates")
    idx = Q.load_index(args.index, use_ann=False if args.exact else None)
    out = (Q.duplicates_answer(idx, args.threshold) if args.duplicates else
           Q.answer(idx, Q.load_query_model(idx, args.device), args.k, text=args.query, image=args.image))
    print(json.dumps(out) if args.json else Q.format_answer(out))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from .search.server import create_app, host_warning, is_loopback, open_indexes, serve
    except ImportError as e:
        raise ConfigError(f"serve needs Flask ({e}): pip install 'clipft[search]'") from None
    warning = host_warning(args.host)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    served = open_indexes(args.index or [".clipft-index"], device=args.device)
    app = create_app(served, loopback_only=is_loopback(args.host))
    names = ", ".join(f"{len(s.idx)} images ({s.idx.model})" for s in served)
    serve(app, args.host, args.port, on_ready=lambda port: print(
        f"serving {names} on http://{args.host}:{port}/ (Ctrl-C to stop)", flush=True))
    return 0


def _add_search_parsers(sub) -> None:
    s = sub.add_parser("index", help="index a folder of images for search (incremental; rerun after changes)")
    s.add_argument("folder")
    s.add_argument("--model", required=True, help="exported model dir, clipft checkpoint, or HF CLIP name/dir")
    s.add_argument("--index", help="index directory (default: FOLDER/.clipft-index)")
    s.add_argument("--rebuild", action="store_true", help="re-embed everything (needed to switch models)")
    s.add_argument("--dtype", choices=["float16", "float32"], default="float16", help="stored embeddings")
    s.add_argument("--ann", action="store_true", help="also build an approximate index (faiss; automatic from 200k images)")
    s.add_argument("--batch-size", type=int, default=64)
    s.add_argument("--workers", type=int, default=None, help="decoding processes (default: automatic)")
    s.add_argument("--device", default="cpu")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=cmd_index)

    s = sub.add_parser("search", help="search an index by text, by example image, or list near-duplicates")
    s.add_argument("query", nargs="?", help='text, e.g. "a dog on the beach"')
    s.add_argument("--index", default=".clipft-index", help="index directory (default: ./.clipft-index)")
    s.add_argument("--k", type=int, default=20, help="results (default 20)")
    s.add_argument("--image", metavar="PATH", help="search by this example image instead of text")
    s.add_argument("--duplicates", action="store_true", help="list groups of near-identical images")
    s.add_argument("--threshold", type=float, default=0.95, help="cosine for --duplicates (default 0.95)")
    s.add_argument("--exact", action="store_true", help="exact search even where an approximate index exists")
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.add_argument("--device", default="cpu")
    s.set_defaults(func=cmd_search)

    s = sub.add_parser("serve", help="local web page and JSON API over one or more indexes")
    s.add_argument("--index", action="append", metavar="PATH",
                   help="index directory, repeatable: several side by side (default: ./.clipft-index)")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    s.add_argument("--device", default="cpu")
    s.set_defaults(func=cmd_serve)


def cmd_embed(args: argparse.Namespace) -> int:
    from .api import load
    from .embed import embed_folder
    if not Path(args.images).is_dir():
        raise ConfigError(f"{args.images}: not a directory")
    device = "cpu" if args.backend == "onnx" and args.device == "auto" else _auto_device(args.device)
    model = load(args.model, device=device, backend=args.backend)
    info = embed_folder(model, args.images, args.out, batch_size=args.batch_size, workers=args.workers,
                        progress=not args.quiet)
    print(f"{info['images']} images embedded ({info['skipped']} unreadable, skipped) in {info['seconds']:.1f}s: "
          f"{info['images_per_s']:.1f} images/s; wrote {info['out']}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export_checkpoint, format_size
    info = export_checkpoint(args.checkpoint, args.out, onnx=args.onnx, check_images=args.check_images)
    if info["onnx_max_abs_diff"] is not None:
        print(f"ONNX check: onnxruntime matches PyTorch on real images (max abs difference "
              f"{info['onnx_max_abs_diff']:.1e})")
    for path, size in info["files"]:
        print(f"wrote {path} ({format_size(size)})")
    if info["open_clip"]:
        print(f"open_clip timm-tower form not written: {info['open_clip']}")
    return 0


def _auto_device(device: str) -> str:
    from .runtime import resolve_device
    return str(resolve_device(device)) if device == "auto" else device


def _add_model_commands(sub: argparse._SubParsersAction) -> None:
    """Commands that take a trained model out of its run: export, embed."""
    s = sub.add_parser("export", help="write a self-contained model folder (safetensors, config, model card, "
                                      "optionally ONNX) in the Hugging Face hub layout")
    s.add_argument("checkpoint", help="a clipft checkpoint (RUN/best.pt)")
    s.add_argument("--out", required=True, help="output folder (new, empty, or an earlier export)")
    s.add_argument("--onnx", action="store_true", help="also write image_tower.onnx, checked with onnxruntime")
    s.add_argument("--check-images", metavar="FOLDER",
                   help="real images for the ONNX check (default: the run's validation images)")
    s.set_defaults(func=cmd_export)
    s = sub.add_parser("embed", help="embed every image of a folder (recursive) into a safetensors file")
    s.add_argument("--model", required=True, help="export folder, checkpoint, or HF CLIP model (name or dir)")
    s.add_argument("--images", required=True, help="folder of images (jpg, jpeg, png, webp, bmp, gif)")
    s.add_argument("--out", required=True, help="output .safetensors (embeddings, relative paths, sizes, mtimes)")
    s.add_argument("--batch-size", type=int, default=64)
    s.add_argument("--workers", type=int, default=None, help="decoding processes (default: CPUs - 1, at most 8)")
    _add_device(s)
    s.add_argument("--backend", choices=["torch", "onnx"], default="torch",
                   help="onnx: the export folder's image_tower.onnx with onnxruntime (CPU)")
    _add_quiet(s, "no progress bar")
    s.set_defaults(func=cmd_embed)


# --------------------------------------------------------------------------- parser

def _add_report_parser(sub) -> None:
    s = sub.add_parser("report", help="write RUN/report.md from a run directory, drawing what it lacks")
    s.add_argument("run")
    s.add_argument("--data", help="the run's dataset, when it moved (default: summary.json's data_root, RUN/data)")
    s.add_argument("--notes", metavar="FILE.md", help="your own section (observations, LLM-usage reflection, "
                                                       "conversation link), included verbatim")
    s.add_argument("--ablation", metavar="DIR", help="add a `clipft ablate --out DIR` study: table and bar chart")
    s.add_argument("--compare", nargs="+", metavar="OTHER_RUN", help="add other runs' Recall@K and curves side by side")
    s.add_argument("--html", action="store_true", help="also write report.html (self-contained, print-friendly)")
    s.add_argument("--pdf", action="store_true", help="also write report.pdf (headless Chromium; implies --html)")
    s.add_argument("--no-draw", action="store_true", help="only the files already in RUN: draw nothing")
    s.add_argument("--seed", type=int, default=0, help="seed of the random examples (default 0)")
    s.add_argument("--device", default="auto")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=cmd_report)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="clipft", description=__doc__.splitlines()[0])
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)
    # Four groups, in the order `clipft --help` lists the commands.
    _add_data_and_train_commands(sub)
    _add_checkpoint_commands(sub)
    _add_tool_commands(sub)
    _add_model_commands(sub)  # export, embed
    _add_search_parsers(sub)  # index, search, serve
    return p


def _add_data_and_train_commands(sub) -> None:
    """make-data, cache-text, validate, prepare-images, train."""
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
    _add_device(s)
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
    _add_quiet(s, "no progress bar")
    _add_config_args(s)
    s.set_defaults(func=cmd_validate)

    s = sub.add_parser("prepare-images", help="decode every image once into a uint8 cache that training reads")
    s.add_argument("--data", required=True)
    _add_val_data(s)
    s.add_argument("--split", nargs="+", default=["train", "val"])
    s.add_argument("--size", type=int, default=None,
                   help="stored square side, short side resized, centre kept (default: data.prepared_size, 256)")
    s.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    _add_quiet(s)
    _add_config_args(s)
    s.set_defaults(func=cmd_prepare_images)

    s = sub.add_parser("train", help="train the image tower (resumes a run already in --out)")
    s.add_argument("--data", required=True, help="COCO root, CSV/TSV/JSONL file, or image folder")
    _add_val_data(s)
    s.add_argument("--out", required=True, help="run directory")
    s.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                   help="continue from OUT/last.pt if present (default); --no-resume starts over")
    _add_quiet(s, "no progress bars")
    _add_config_args(s)
    s.set_defaults(func=cmd_train)


def _add_checkpoint_commands(sub) -> None:
    """evaluate, zeroshot, visualize: what is done with a trained checkpoint."""
    s = sub.add_parser("evaluate", help="Recall@K of a checkpoint under a protocol (val, val-full, karpathy-test)")
    s.add_argument("--checkpoint", required=True)
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
    s.add_argument("--checkpoint", required=True)
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
    s.add_argument("--top-k", type=int, default=5, help="classes printed per --image (default 5)")
    s.add_argument("--plot", metavar="PNG", help="with --image: the images beside their probability bars")
    s.add_argument("--out", metavar="DIR", help="with --data: output folder (default: the checkpoint's folder)")
    s.add_argument("--examples", type=int, default=6, help="images in the examples picture (default 6)")
    s.add_argument("--seed", type=int, default=0)
    _add_device(s)
    _add_quiet(s)
    _add_overrides(s)
    s.set_defaults(func=cmd_zeroshot)

    s = sub.add_parser("visualize", help="retrieval / zero-shot / heatmap / training-curve pictures (PNG)")
    s.add_argument("kind", choices=["text-to-image", "image-to-text", "heatmap", "zero-shot", "curves", "all"])
    s.add_argument("--checkpoint", help="trained checkpoint (all kinds but curves)")
    s.add_argument("--data", help="dataset root (all kinds but curves)")
    s.add_argument("--run", help="run directory (curves)")
    _add_split_args(s)
    s.add_argument("--queries", nargs="+", metavar="TEXT",
                   help="text-to-image: free-text queries (default: random captions of the split)")
    s.add_argument("--n", type=int, default=4, help="rows per picture: queries / images (zero-shot: 2 images "
                                                    "per row) (default 4)")
    s.add_argument("--heatmap-images", type=int, default=10, help="images in the heatmap (default 10)")
    s.add_argument("--labels", nargs="+", metavar="NAME", help="zero-shot: class names")
    s.add_argument("--labels-from", metavar="SOURCE", help="zero-shot: ground truth (default shapes)")
    s.add_argument("--template", action="append", metavar="TEXT", help="zero-shot: prompt template(s)")
    s.add_argument("--embeddings", metavar="FILE", help="reuse a file written by evaluate --save-embeddings")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", help="PNG path (for all and zero-shot: a folder); default: the checkpoint's folder")
    _add_device(s)
    _add_quiet(s)
    _add_overrides(s)
    s.set_defaults(func=cmd_visualize)


def _add_tool_commands(sub) -> None:
    """inspect-data, report, download, ablate, demo."""
    s = sub.add_parser("inspect-data", help="picture of random image-caption pairs (integrity check)")
    s.add_argument("--data", required=True)
    s.add_argument("--split", default="train")
    s.add_argument("--n", type=int, default=6)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", help="PNG path (default: data_samples_<split>.png in the current folder)")
    _add_config_args(s)
    s.set_defaults(func=cmd_inspect_data)

    _add_report_parser(sub)

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
    _add_quiet(s, "no progress bars")
    s.set_defaults(func=cmd_download)

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
    _add_quiet(s, "no progress bars")
    _add_overrides(s, "override the base config for every run (repeatable)")
    s.set_defaults(func=cmd_ablate)

    s = sub.add_parser("demo", help="embedded end-to-end demo on synthetic data, CPU, offline")
    s.add_argument("--out", default="runs/demo")
    s.add_argument("--data", help="dataset dir (default: OUT/data, generated if absent)")
    s.add_argument("--train-images", type=int, default=PRESETS["demo"]["data"]["train_images"])
    s.add_argument("--val-images", type=int, default=PRESETS["demo"]["data"]["val_images"])
    _add_quiet(s)
    _add_overrides(s)
    s.set_defaults(func=cmd_demo)


def main(argv: list[str] | None = None) -> int:
    from .runlog import record_command, run_dir_of
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # PyTorch's CPU allocator asks for transparent huge pages for buffers >= 2 MB: a 128-image float
    # batch is 77 MB, and faulting it in 4 KB pages costs more than normalising it (torch reads the
    # variable at allocation time; DataLoader workers inherit it).
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    code = 1  # an unexpected exception propagates with this status in RUN/commands.txt
    try:
        args.extra_overrides = _split_extra(extra)
        code = args.func(args)
        return code
    except _expected_errors() as e:  # one line; Preempted: its own line and 128 + signal (requeue)
        print(getattr(e, "line", f"clipft: error: {e}"), file=sys.stderr)
        code = getattr(e, "exit_code", EXIT_USAGE)
        return code
    except KeyboardInterrupt:
        print("clipft: interrupted (the last completed checkpoint is intact)", file=sys.stderr)
        code = 130
        return code
    finally:
        if run_dir_of(args) is not None:  # how the run was made: RUN/commands.txt (see clipft.runlog)
            record_command(run_dir_of(args), argv, code)


if __name__ == "__main__":
    sys.exit(main())
