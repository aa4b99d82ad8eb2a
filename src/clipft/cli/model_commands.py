"""Command line, part two: the commands that take a model out of its run (export, embed) and search
your photos (index, search, serve). `cli` builds the parser with these; only the two parse argv."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .args import _add_device, _add_quiet, device_name, int_range, non_negative_int, positive_int
from ..config import ConfigError

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- search your photos

def cmd_index(args: argparse.Namespace) -> int:
    from ..inference import load
    from ..search.index import default_index_dir, update_index
    from ..search.query import CALIBRATION_TEXTS, ann_report, check_model_source, model_source, refresh_ann
    from .. import distributed
    index_dir = Path(args.index) if args.index else default_index_dir(args.folder)
    check_model_source(args.model)  # what `clipft search` will accept as this index's model
    ctx = distributed.setup(args.device)  # under torchrun: one process group, gloo on the CPU
    try:
        model = load(args.model, device=str(ctx.device) if ctx.distributed else args.device)
        extra = {"chunk_size": args.chunk_size} if args.chunk_size else {}
        s = update_index(args.folder, model, index_dir, model_source=model_source(args.model),
                         rebuild=args.rebuild, dtype=args.dtype, batch_size=args.batch_size, workers=args.workers,
                         progress=not args.quiet, **extra)
    finally:
        distributed.teardown(ctx)
    if not ctx.is_main:  # under torchrun: rank 0 reports and builds the approximate index
        return 0
    print(f"{index_dir}: {s.summary()}")
    if refresh_ann(index_dir, force=args.ann, text_queries=lambda: model.encode_texts(CALIBRATION_TEXTS)) is not None:
        print(ann_report(index_dir))
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    import json
    if sum(map(bool, (args.query, args.image, args.duplicates))) != 1:
        raise ConfigError("search: give one of QUERY, --image PATH or --duplicates")
    if args.duplicates and not -1.0 <= args.threshold <= 1.0:  # also refuses nan (every comparison is False)
        raise ConfigError(f"search: --threshold is a cosine from -1 to 1, got {args.threshold}")
    from ..search import query as Q  # after the argument checks: it imports torch (seconds)
    idx = Q.load_index(args.index, use_ann=False if args.exact else None)
    out = (Q.duplicates_answer(idx, args.threshold) if args.duplicates else
           Q.answer(idx, Q.load_query_model(idx, args.device, args.query_encoder), args.k, text=args.query, image=args.image))
    _absolute_paths(out, Path(idx.root))
    print(json.dumps(out) if args.json else Q.format_answer(out))
    return 0


def _absolute_paths(out: dict, root: Path) -> None:
    """In place: each hit's "path" becomes absolute (a user's shell is rarely in the indexed folder);
    the folder-relative path the index stores stays as "relative_path", beside the id."""
    for hit in [h for g in out.get("groups", []) for h in g] + out.get("results", []):
        hit["relative_path"] = hit["path"]
        hit["path"] = str(root / hit["path"])


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from ..search.server import create_app, host_warning, is_loopback, open_indexes, serve
    except ImportError as e:
        raise ConfigError(f"serve needs Flask ({e}): pip install 'clipft[search]'") from None
    warning = host_warning(args.host)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    served = open_indexes(args.index or [".clipft-index"], device=args.device, query_encoder=args.query_encoder)
    app = create_app(served, loopback_only=is_loopback(args.host))
    names = ", ".join(f"{len(s.idx)} images ({s.idx.model})" for s in served)
    serve(app, args.host, args.port, on_ready=lambda port: print(
        f"serving {names} on http://{args.host}:{port}/ (Ctrl-C to stop)", flush=True))
    return 0


def add_search_commands(sub) -> None:
    s = sub.add_parser("index", help="index a folder of images for search (incremental; rerun after changes)")
    s.add_argument("folder", help="folder of images to index (searched recursively)")
    s.add_argument("--model", required=True, help="exported model dir, clipft checkpoint, or HF CLIP name/dir")
    s.add_argument("--index", help="index directory (default: FOLDER/.clipft-index)")
    s.add_argument("--rebuild", action="store_true", help="re-embed everything (needed to switch models)")
    s.add_argument("--dtype", choices=["float16", "float32"], default="float16", help="stored embeddings")
    s.add_argument("--ann", nargs="?", const="flat", choices=["flat", "pq"], default=None,
                   help="also build an approximate index (faiss): flat (IVF-Flat, what --ann alone gives; automatic "
                        "from 200k images) or pq (IVF-PQ, memory-mapped, re-ranked exactly; automatic from 5M)")
    s.add_argument("--chunk-size", type=positive_int, default=None,
                   help="images per committed chunk: the most work a kill can lose (default 512)")
    s.add_argument("--batch-size", type=positive_int, default=64, help="images per forward pass (default 64)")
    s.add_argument("--workers", type=non_negative_int, default=None, help="decoding processes (default: automatic)")
    s.add_argument("--device", type=device_name, default="cpu", help="cpu (default), cuda or cuda:N")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_index)

    s = sub.add_parser("search", help="search an index by text, by example image, or list near-duplicates")
    s.add_argument("query", nargs="?", help='text, e.g. "a dog on the beach"')
    s.add_argument("--index", default=".clipft-index", help="index directory (default: ./.clipft-index)")
    s.add_argument("--k", type=positive_int, default=20, help="results (default 20)")
    s.add_argument("--image", metavar="PATH", help="search by this example image instead of text")
    s.add_argument("--duplicates", action="store_true", help="list groups of near-identical images")
    s.add_argument("--threshold", type=float, default=0.95, help="cosine for --duplicates (default 0.95)")
    s.add_argument("--exact", action="store_true", help="exact search even where an approximate index exists")
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.add_argument("--query-encoder", metavar="NAME_OR_PATH",
                   help="embed text queries with this encoder (e.g. a multilingual one) instead of the frozen one; "
                        "it must declare the model's text space (clipft_query_encoder.json)")
    s.add_argument("--device", type=device_name, default="cpu", help="cpu (default), cuda or cuda:N: where queries are embedded")
    s.set_defaults(func=cmd_search)

    s = sub.add_parser("serve", help="local web page and JSON API over one or more indexes")
    s.add_argument("--index", action="append", metavar="PATH",
                   help="index directory, repeatable: several side by side (default: ./.clipft-index)")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int_range(0, 65535), default=8000, help="port (default 8000; 0 picks a free one)")
    s.add_argument("--query-encoder", metavar="NAME_OR_PATH",
                   help="embed text queries with this encoder (e.g. a multilingual one) instead of the frozen one; "
                        "it must declare the model's text space (clipft_query_encoder.json)")
    s.add_argument("--device", type=device_name, default="cpu", help="cpu (default), cuda or cuda:N: where queries are embedded")
    s.set_defaults(func=cmd_serve)


def cmd_embed(args: argparse.Namespace) -> int:
    from ..inference import load
    from ..embed import embed_folder
    if not Path(args.images).is_dir():
        raise ConfigError(f"{args.images}: not a directory")
    from .. import distributed
    onnx = args.backend == "onnx" or str(args.model).endswith(".onnx")  # an .onnx file runs on onnxruntime
    ctx = distributed.setup("cpu" if onnx else args.device)  # under torchrun: gloo on the CPU
    if ctx.distributed:
        device = str(ctx.device)
    else:
        device = "cpu" if onnx and args.device == "auto" else _auto_device(args.device)
    try:
        model = load(args.model, device=device, backend=args.backend)
        info = embed_folder(model, args.images, args.out, batch_size=args.batch_size, workers=args.workers,
                            progress=not args.quiet)
    finally:
        distributed.teardown(ctx)
    if not ctx.is_main:
        return 0
    print(f"{info['images']} images embedded ({info['skipped']} unreadable, skipped) in {info['seconds']:.1f}s: "
          f"{info['images_per_s']:.1f} images/s; wrote {info['out']}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    if args.quantize and not args.onnx:  # before the import: an argument error answers at once
        raise ConfigError("--quantize int8 needs --onnx: it quantizes the float ONNX image tower")
    from ..export import export_checkpoint, format_size
    info = export_checkpoint(args.checkpoint, args.out, onnx=args.onnx, check_images=args.check_images,
                             format=args.format, quantize=args.quantize)
    if info["onnx_max_abs_diff"] is not None:
        print(f"ONNX check: onnxruntime matches PyTorch on real images (max abs difference "
              f"{info['onnx_max_abs_diff']:.1e})")
    if (q := info.get("onnx_int8")) is not None:
        print(f"int8 check: mean cosine to the float tower {q['mean_cosine']:.4f}, mean R@5 drop "
              f"{q['mean_r5_drop']:.1f} points on {q['measured_images']} validation images, {q['speedup']:.2f}x speed")
    for path, size in info["files"]:
        print(f"wrote {path} ({format_size(size)})")
    if info["open_clip"]:
        print(f"open_clip model not written: {info['open_clip']}")
    return 0


def _auto_device(device: str) -> str:
    from ..runtime import resolve_device
    return str(resolve_device(device)) if device == "auto" else device


def add_model_commands(sub: argparse._SubParsersAction) -> None:
    """Commands that take a trained model out of its run: export, embed."""
    s = sub.add_parser("export", help="write a self-contained model folder (safetensors, config, model card, "
                                      "optionally ONNX) in the Hugging Face hub layout")
    s.add_argument("checkpoint", help="a clipft checkpoint (RUN/best.pt)")
    s.add_argument("--out", required=True, help="output folder (new, empty, or an earlier export)")
    s.add_argument("--onnx", action="store_true", help="also write image_tower.onnx, checked with onnxruntime")
    s.add_argument("--check-images", metavar="FOLDER",
                   help="real images for the ONNX check (default: the run's validation images)")
    s.add_argument("--format", choices=["clipft", "open_clip"], default=None,
                   help="open_clip: require the whole open_clip model (open_clip_config.json + weights; refused "
                        "with the reason when the towers do not map). Default: written wherever they map")
    s.add_argument("--quantize", choices=["int8"], default=None,
                   help="with --onnx: also write image_tower.int8.onnx, measured on the validation images")
    s.set_defaults(func=cmd_export)
    s = sub.add_parser("embed", help="embed every image of a folder (recursive) into a safetensors file")
    s.add_argument("--model", required=True, help="export folder, checkpoint, or HF CLIP model (name or dir)")
    s.add_argument("--images", required=True, help="folder of images (jpg, jpeg, png, webp, bmp, gif)")
    s.add_argument("--out", required=True, help="output .safetensors (embeddings, relative paths, sizes, mtimes)")
    s.add_argument("--batch-size", type=positive_int, default=64, help="images per forward pass (default 64)")
    s.add_argument("--workers", type=non_negative_int, default=None,
                   help="decoding processes (default: CPUs - 1, at most 8)")
    _add_device(s)
    s.add_argument("--backend", choices=["torch", "onnx"], default="torch",
                   help="onnx: the export folder's image_tower.onnx with onnxruntime (CPU)")
    _add_quiet(s, "no progress bar")
    s.set_defaults(func=cmd_embed)
