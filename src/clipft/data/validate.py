"""Check a dataset before training: `clipft validate` (the full report) and `preflight` (the fast
subset `clipft train` runs first).

The report counts, per split: images listed, found, missing, unreadable (and why) or oddly encoded
(CMYK, 16-bit, transparency, EXIF rotation, PNG data in a .jpg ...); captions per image; dropped
captions by reason (empty, whitespace-only, placeholders such as "None"/"NA"/"nan", malformed rows);
exact duplicate captions; token lengths against the text encoder's limit; and images that appear in
both train and validation, found by file content (sha256), not by name.

Prepared image caches (`clipft prepare-images`) of both splits are checked too: their file sizes,
and with `deep=True` (`clipft validate --deep`) the checksum of every chunk.

Errors (the report's `ok` is False, `clipft validate` exits 1) are what would spoil training: a
split that cannot be loaded, a split with no readable image or no caption, a train/val leak, a
damaged prepared cache. Everything else is a warning.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import statistics
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable, Sequence

from PIL import Image

from ..config import Config, DataConfig
from ..runtime import atomic_write_text, ensure_writable_dir, make_parent_dir, writable_dir
from .caches import prepared_split_dirs, user_cache_dir
from .formats import FORMAT_REGISTRY, resolve_format
from .images import load_image
from ..preprocess import _open_image_file
from .prepared_reader import PreparedImages
from . import tabular
from .records import CaptionedImages, DataError
from .splits import load_split, split_source

log = logging.getLogger(__name__)

EXAMPLES = 5  # examples kept per finding
HEAD_BYTES = 1 << 16  # leak check: files of equal size are compared on their first 64 KiB first
TINY_SIDE = 32  # images with a side below this many pixels are reported as odd
# What an extension promises; PIL's format name of the content must match it.
_EXT_FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".webp": "WEBP", ".bmp": "BMP",
                ".gif": "GIF", ".tif": "TIFF", ".tiff": "TIFF"}
_EXIF_ORIENTATION = 0x0112
# Dropped-caption reasons (CaptionedImages.caption_problems keys) in words.
REASON_WORDS = {"empty": "empty", "whitespace": "whitespace-only", "placeholder": "placeholder (None/NA/nan...)",
                "missing": "missing (absent cell or null)", "not_text": "not text", "malformed_row": "in malformed rows",
                "no_image_path": "without an image path", "no_image": "in .txt files without an image",
                "not_utf8": "in .txt files that are not UTF-8",
                "image_not_found": "naming an image file that is not in the image folder"}


def _reasons(dropped: dict[str, int]) -> str:
    return ", ".join(f"{n} {REASON_WORDS.get(r, r)}" for r, n in dropped.items())


# --------------------------------------------------------------------------- leak (content hash)

def _hash_file(path: Path, limit: int | None = None) -> str:
    """sha256 of the whole file, or of its first `limit` bytes."""
    h = hashlib.sha256()
    with _open_image_file(path) as f:  # a file, or a webdataset shard member
        if limit is not None:
            h.update(f.read(limit))
        else:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _member_size(path: Path) -> int:
    """The size of a webdataset shard member ('SHARD.tar/KEY.jpg'), or of a file of that name."""
    from .shards import member_size
    size = member_size(path)
    return os.stat(path).st_size if size is None else size


def _sizes(paths: Iterable[Path]) -> dict[Path, int]:
    out = {}
    for p in paths:
        try:
            out[p] = os.stat(p).st_size if ".tar/" not in str(p) else _member_size(p)
        except OSError:
            continue  # missing files cannot leak; they are reported elsewhere
    return out


def find_shared_images(train_paths: Iterable[Path], val_paths: Iterable[Path]) -> list[tuple[Path, Path]]:
    """(train path, val path) for every validation image whose file content equals a training
    image's (same path or not). Exact, and fast on large splits: only files of equal size are
    compared, first by a hash of their first 64 KiB, then by sha256 of the whole file."""
    train_sizes = _sizes(dict.fromkeys(train_paths))
    by_size: dict[int, list[Path]] = defaultdict(list)
    for p, size in train_sizes.items():
        by_size[size].append(p)
    head: dict[Path, str] = {}
    full: dict[Path, str] = {}

    def digest(p: Path, memo: dict[Path, str], limit: int | None) -> str | None:
        if p not in memo:
            try:
                memo[p] = _hash_file(p, limit)
            except OSError:
                memo[p] = ""
        return memo[p] or None

    def same(p: Path, q: Path, size: int) -> bool:
        if p == q:
            return True
        hp = digest(p, head, HEAD_BYTES)
        if hp is None or hp != digest(q, head, HEAD_BYTES):
            return False
        if size <= HEAD_BYTES:
            return True  # the head was the whole file
        fp = digest(p, full, None)
        return fp is not None and fp == digest(q, full, None)

    pairs = []
    for q, size in _sizes(dict.fromkeys(val_paths)).items():
        for p in by_size.get(size, ()):
            if same(p, q, size):
                pairs.append((p, q))
                break
    return pairs


def _leak_message(val: CaptionedImages, pairs: list[tuple[Path, Path]]) -> str:
    p, q = pairs[0]
    return (f"{len(pairs)} validation image(s) of {val.name} are also in the training data (identical file "
            f"content), e.g. {q} = {p}: validation scores would be inflated. Remove them from one side "
            "(`clipft validate` lists them), or set data.leak_check=warn to train anyway")


# --------------------------------------------------------------------------- preflight (clipft train)

def _image_exists(path: Path) -> bool:
    """An image file, or a member of a webdataset shard ('SHARD.tar/KEY.jpg')."""
    if path.is_file():
        return True
    from .shards import member_exists
    return ".tar/" in str(path) and member_exists(path)


def preflight(train: CaptionedImages, val: CaptionedImages, cfg: DataConfig) -> list[str]:
    """The fast checks `clipft train` runs before anything trains (file existence, no decoding;
    the leak check hashes only files of equal size). Raises DataError (one line) for a split whose
    image files are all missing and for a train/val leak (unless data.leak_check is warn/off);
    returns (and logs) the warnings."""
    warnings = []
    for ds in (train, val):
        missing = [r.path for r in ds.images if not _image_exists(r.path)]
        if missing and len(missing) == len(ds):
            raise DataError(f"{missing[0]}: none of the {len(ds)} image files of {ds.name} exist (this is the "
                            "first); image paths in CSV/JSONL files are relative to the file")
        if missing:
            warnings.append(f"{ds.name}: {len(missing)} of {len(ds)} image files are missing (e.g. {missing[0]}); "
                            "they will be skipped")
    if cfg.leak_check != "off":
        pairs = find_shared_images((r.path for r in train.images), (r.path for r in val.images))
        if pairs:
            if cfg.leak_check == "error":
                raise DataError(_leak_message(val, pairs))
            warnings.append(_leak_message(val, pairs))
    for w in warnings:
        log.warning("%s", w)
    return warnings


# --------------------------------------------------------------------------- images

def inspect_image(path: Path, draft_size: int | None = None) -> dict[str, Any]:
    """{"status": "ok" | "missing" | "unreadable", "reason": why not ok, "odd": [notes]}.

    ok images may still be oddly encoded: content that does not match the extension, CMYK,
    16/32-bit or greyscale pixels, transparency, an EXIF rotation (used as stored), animation,
    a side under 32 px. Decoding is the one training uses (`load_image`), so "ok" means usable.
    """
    path = Path(path)
    odd: list[str] = []
    try:
        with _open_image_file(path) as f:  # a file, or a webdataset shard member
            im = Image.open(f)  # reads the header only
            fmt, mode, size = im.format, im.mode, im.size
            ext = path.suffix.lower()
            if ext in _EXT_FORMATS and fmt and _EXT_FORMATS[ext] != fmt and not (fmt == "MPO" and ext in (".jpg", ".jpeg")):
                odd.append(f"{fmt} data in a {ext} file")
            if mode == "CMYK":
                odd.append("CMYK colour (converted to RGB)")
            elif mode in ("I", "F") or mode.startswith("I;16"):
                odd.append(f"{mode} high-bit-depth pixels (rescaled to 8-bit)")
            elif mode in ("L", "1", "LA"):
                odd.append(f"greyscale ({mode})")
            elif mode not in ("RGB", "RGBA", "P", "PA"):
                odd.append(f"colour mode {mode} (converted to RGB)")
            if mode in ("RGBA", "LA", "PA") or "transparency" in im.info:
                odd.append("transparency (composited on white)")
            try:
                orientation = im.getexif().get(_EXIF_ORIENTATION, 1)
            except Exception:  # noqa: BLE001 - a broken EXIF block is not our problem here
                orientation = 1
            if orientation not in (None, 1):
                odd.append(f"EXIF orientation {orientation} (used as stored, not rotated)")
            if getattr(im, "n_frames", 1) > 1:
                odd.append(f"{im.n_frames} frames (the first is used)")
            if min(size) < TINY_SIDE:
                odd.append(f"tiny ({size[0]}x{size[1]} px)")
    except FileNotFoundError:
        return {"status": "missing", "reason": "missing", "odd": []}
    except Exception:  # noqa: BLE001 - load_image below classifies the failure
        pass
    img, reason = load_image(path, draft_size, warn=False)
    if img is None:
        return {"status": "missing" if reason == "missing" else "unreadable", "reason": reason, "odd": []}
    return {"status": "ok", "reason": None, "odd": odd}


def _odd_kind(note: str) -> str:
    for key, kind in (("data in a", "extension_mismatch"), ("CMYK", "cmyk"), ("high-bit", "high_bit_depth"),
                      ("greyscale", "greyscale"), ("colour mode", "colour_mode"), ("transparency", "transparency"),
                      ("EXIF", "exif_rotation"), ("frames", "animated"), ("tiny", "tiny")):
        if key in note:
            return kind
    return "other"


def _found(count: int, examples: list[str]) -> dict:
    return {"count": count, "examples": examples[:EXAMPLES]}


def check_images(ds: CaptionedImages, draft_size: int | None = None, workers: int = 4,
                 progress: bool = False) -> dict[str, Any]:
    """Open and decode every image of a split (threads: PIL decodes without the GIL)."""
    paths = [r.path for r in ds.images]
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = pool.map(lambda p: inspect_image(p, draft_size), paths)
        if progress:
            from tqdm.auto import tqdm
            results = tqdm(results, total=len(paths), desc=f"images ({ds.name})", leave=False)
        results = list(results)
    missing = [str(p) for p, r in zip(paths, results) if r["status"] == "missing"]
    unreadable = [f"{p}: {r['reason']}" for p, r in zip(paths, results) if r["status"] == "unreadable"]
    odd = [(p, r["odd"]) for p, r in zip(paths, results) if r["odd"]]
    kinds = Counter(_odd_kind(n) for _, notes in odd for n in notes)
    return {
        "listed": len(ds) + ds.dropped_images,
        "with_captions": len(ds),
        "found": len(ds) - len(missing),
        "readable": sum(r["status"] == "ok" for r in results),
        "missing": _found(len(missing), missing),
        "unreadable": _found(len(unreadable), unreadable),
        "odd": {"count": len(odd), "by_kind": dict(sorted(kinds.items())),
                "examples": [f"{p}: {'; '.join(n)}" for p, n in odd[:EXAMPLES]]},
        "without_captions": _found(ds.dropped_images, ds.examples.get("image_without_caption", [])),
    }


# --------------------------------------------------------------------------- captions and tokens

def caption_stats(ds: CaptionedImages) -> dict[str, Any]:
    """Captions per image, dropped captions by reason, exact duplicates."""
    per_image = [len(r.captions) for r in ds.images]
    caps = ds.captions
    counts = Counter(caps)
    repeated = {t: n for t, n in counts.items() if n > 1}
    owners: dict[str, set[int]] = defaultdict(set)
    for text, row in zip(caps, ds.caption_to_image.tolist()):
        if text in repeated:
            owners[text].add(row)
    return {
        "kept": len(caps),
        "per_image": {"min": min(per_image, default=0), "median": statistics.median(per_image) if per_image else 0,
                      "max": max(per_image, default=0)},
        "dropped": dict(sorted(ds.caption_problems.items())),
        "dropped_examples": {k: v for k, v in sorted(ds.examples.items()) if k != "image_without_caption"},
        "duplicates": {
            "captions": sum(n - 1 for n in repeated.values()),  # copies beyond the first
            "texts": len(repeated),  # distinct texts that occur more than once
            "across_images": sum(len(o) > 1 for o in owners.values()),  # ... on different images
            "top": [[t, n] for t, n in counts.most_common(EXAMPLES) if n > 1],
        },
    }


def token_lengths(captions: Sequence[str], encoder: Any, batch: int = 4096) -> list[int]:
    """Token count of every caption with the text encoder's own tokenizer, special tokens included,
    without truncation (so captions longer than the encoder's limit show as such)."""
    from ..text import _quiet_transformers
    tok = encoder.tokenizer if encoder.kind == "clip" else encoder.module.tokenizer
    out: list[int] = []
    with _quiet_transformers():  # no "sequence longer than the maximum" warning per batch
        for s in range(0, len(captions), batch):
            ids = tok(list(captions[s:s + batch]), truncation=False, padding=False)["input_ids"]
            out.extend(len(x) for x in ids)
    return out


def token_stats(captions: Sequence[str], encoder: Any) -> dict[str, Any]:
    """Token-length statistics against the encoder's limit (its max_length, 77 for CLIP)."""
    lengths = token_lengths(captions, encoder)
    limit = encoder.max_length
    over = [i for i, n in enumerate(lengths) if n > limit]
    ordered = sorted(lengths)

    def pct(q: float) -> int:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0

    return {"encoder": encoder.name, "kind": encoder.kind, "limit": limit,
            "min": ordered[0] if ordered else 0, "median": pct(0.5), "p95": pct(0.95),
            "max": ordered[-1] if ordered else 0, "truncated": len(over),
            "truncated_examples": [f"{lengths[i]} tokens: {captions[i][:100]!r}" for i in over[:EXAMPLES]]}


# --------------------------------------------------------------------------- prepared image caches

def check_prepared(data: str | Path, split: str, cfg: Config, deep: bool = False,
                   progress: bool = False) -> list[dict[str, Any]]:
    """Every prepared cache of a split (one per size): {"path", "status", "problem", "checked"}.
    status: ok, damaged (sizes, or with `deep` a chunk checksum, do not match), incomplete
    (prepare-images did not finish) or old (an older format without checksums)."""
    out = []
    for path in prepared_split_dirs(data, split, cfg):
        entry: dict[str, Any] = {"path": str(path), "status": "ok", "problem": None,
                                 "checked": "every chunk" if deep else "file sizes"}
        if not (path / "index.json").is_file():
            entry.update(status="incomplete", problem=f"{path}: prepare-images did not finish (rerun it to resume)")
        else:
            try:
                prepared = PreparedImages.open(path)
                if prepared is None:
                    entry.update(status="old", problem=f"{path}: prepared by an older clipft without checksums "
                                                       "(training decodes JPEGs; rerun prepare-images)")
                elif deep:
                    prepared.verify(progress=progress)
            except DataError as e:
                entry.update(status="damaged", problem=str(e))
        out.append(entry)
    return out


# --------------------------------------------------------------------------- the report

def _split_report(ds: CaptionedImages, cfg: Config, encoder: Any, progress: bool) -> dict[str, Any]:
    rep: dict[str, Any] = {"name": ds.name}
    rep["images"] = check_images(ds, cfg.data.image_size, cfg.data.num_workers, progress)
    rep["captions"] = caption_stats(ds)
    if encoder is not None:
        rep["tokens"] = token_stats(ds.captions, encoder)
    return rep


def _findings(name: str, rep: dict, errors: list[str], warnings: list[str]) -> None:
    im, cap = rep["images"], rep["captions"]
    if im["readable"] == 0:
        errors.append(f"{name}: no readable image ({im['with_captions']} captioned images listed, "
                      f"{im['missing']['count']} missing, {im['unreadable']['count']} unreadable)")
    if cap["kept"] == 0:
        errors.append(f"{name}: no usable caption")
    for key, what in (("missing", "image file(s) missing"), ("unreadable", "image(s) unreadable")):
        if im[key]["count"]:
            warnings.append(f"{name}: {im[key]['count']} {what} (skipped in training), e.g. {im[key]['examples'][0]}")
    if im["odd"]["count"]:
        kinds = ", ".join(f"{n} {k}" for k, n in im["odd"]["by_kind"].items())
        warnings.append(f"{name}: {im['odd']['count']} oddly encoded image(s) ({kinds}), e.g. {im['odd']['examples'][0]}")
    if im["without_captions"]["count"]:
        warnings.append(f"{name}: {im['without_captions']['count']} image(s) without a usable caption (left out)")
    if cap["dropped"]:
        warnings.append(f"{name}: {sum(cap['dropped'].values())} caption(s) dropped ({_reasons(cap['dropped'])})")
    dup = cap["duplicates"]
    if dup["across_images"]:
        warnings.append(f"{name}: {dup['across_images']} caption text(s) shared by different images "
                        f"(they act as false negatives), e.g. {dup['top'][0][0]!r} x{dup['top'][0][1]}")
    tok = rep.get("tokens")
    if tok and tok["truncated"]:
        warnings.append(f"{name}: {tok['truncated']} caption(s) longer than the text encoder's {tok['limit']} "
                        f"tokens (truncated), longest {tok['max']}")


def _check_csv_rows(data: str | Path, dcfg: Any, errors: list[str]) -> None:
    """A CSV/TSV source: the rows read (captions kept + dropped) against the physical lines of the
    file that look like rows (`tabular.csv_row_lines`). Fewer rows read than such lines means rows
    vanished inside another field (a quote left open) or were lost otherwise: an error."""
    for source in dict.fromkeys(p for p in (data, dcfg.val_path) if p):
        source = Path(source)
        if not tabular.is_csv(source):
            continue
        try:
            path, lines = tabular.csv_row_lines(source, dcfg)
            whole = tabular.load_csv_captions(path, dcfg)
        except DataError:
            continue  # already reported by the split that failed to load
        read = len(whole.captions) + whole.dropped_captions
        if read < lines:
            errors.append(f"{path}: {lines} rows name image files but only {read} were read: rows are "
                          "swallowed (a quote left open?) or lost; check the file around the first missing image")


def validate_data(data: str | Path, cfg: Config | None = None, val_data: str | Path | None = None,
                  check_tokens: bool = True, progress: bool = False, deep: bool = False) -> dict[str, Any]:
    """The full report on a dataset (and its validation data) as a JSON-ready dict; see the module
    docstring. Uses cfg's data settings (format, columns, val_fraction, seed) and text encoder, but
    never a train/val subset: every image is checked. `deep`: hash every chunk of the prepared
    image caches (else their sizes only). report["ok"] is False when training would be spoiled."""
    cfg = cfg or Config()
    dcfg = dataclasses.replace(cfg.data, train_images=0, val_images=0,
                               val_path=str(val_data) if val_data else cfg.data.val_path)
    cfg = dataclasses.replace(cfg, data=dcfg)
    errors: list[str] = []
    warnings: list[str] = []
    report: dict[str, Any] = {"data": str(data), "val_data": dcfg.val_path or None}
    try:
        fmt = resolve_format(data, dcfg)
    except DataError as e:
        report.update(errors=[str(e)], warnings=[], ok=False, splits={})
        return report
    report["format"] = fmt
    describe = FORMAT_REGISTRY[fmt].describe_splits
    if fmt == "coco" and not dcfg.val_path:
        report["split"] = f"COCO layout: {dcfg.train_split} / {dcfg.val_split}"
    elif describe is not None and not dcfg.val_path:
        report["split"] = describe(Path(data))
    elif dcfg.val_path:
        report["split"] = f"train: all of {data}; val: {dcfg.val_path}"
    else:
        report["split"] = (f"by image: {dcfg.val_fraction:.0%} of the images for validation "
                           f"(data.val_fraction, seed data.subset_seed={dcfg.subset_seed})")

    encoder = None
    if check_tokens:
        from ..text import TextEncoderError, load_text_encoder
        try:
            encoder = load_text_encoder(cfg.text.encoder, device="cpu", max_length=cfg.text.max_length)
            report["text_encoder"] = cfg.text.encoder
        except TextEncoderError as e:
            warnings.append(f"token lengths not checked: {e}")

    splits: dict[str, CaptionedImages] = {}
    report["splits"] = {}
    extra = () if dcfg.val_path else FORMAT_REGISTRY[fmt].extra_splits  # e.g. Flickr's test split
    for role, split in (("train", dcfg.train_split), ("val", dcfg.val_split), *((s, s) for s in extra)):
        try:
            splits[role] = load_split(data, split, dcfg)
        except DataError as e:
            errors.append(f"{role}: {e}")
            continue
        report["splits"][role] = rep = _split_report(splits[role], cfg, encoder, progress)
        rep["source"] = str(split_source(data, split, dcfg).path)
        _findings(role, rep, errors, warnings)
        rep["prepared"] = check_prepared(data, split, cfg, deep, progress)
        for entry in rep["prepared"]:
            if entry["problem"]:
                (errors if entry["status"] == "damaged" else warnings).append(f"{role}: {entry['problem']}")

    _check_csv_rows(data, dcfg, errors)
    if "train" in splits and "val" in splits:
        pairs = find_shared_images((r.path for r in splits["train"].images), (r.path for r in splits["val"].images))
        report["leak"] = {"images_in_both": len(pairs), "method": "sha256 of the file content",
                          "examples": [f"val {q} = train {p}" for p, q in pairs[:EXAMPLES]]}
        if pairs:
            (errors if dcfg.leak_check == "error" else warnings).append(_leak_message(splits["val"], pairs))
    report.update(errors=errors, warnings=warnings, ok=not errors)
    return report


def default_report_path(data: str | Path) -> Path:
    """Where `clipft validate` writes its JSON by default: DIR/validate_report.json for a
    directory, <file stem>.validate.json beside a file. When that folder cannot be written (a
    read-only dataset), the same name in the dataset's user cache dir (where its caches go too)."""
    data = Path(data)
    path = data / "validate_report.json" if data.is_dir() else data.with_name(f"{data.stem}.validate.json")
    if writable_dir(path.parent):
        return path
    return user_cache_dir(path.parent) / path.name


def report_destination(data: str | Path, out: str | Path | None = None) -> Path:
    """Where `clipft validate` will write its report (`out`, or `default_report_path`), checked before
    the work: DataError for a `data` path that is not there (no report beside it), StorageError
    (one line) for a folder that cannot be written."""
    if not Path(data).exists():
        raise DataError(f"{data}: no such file or directory")
    path = Path(out) if out else default_report_path(data)
    ensure_writable_dir(path.parent, "pass --out to write the report elsewhere")
    return path


def write_report_json(report: dict, path: str | Path) -> Path:
    """Write the report as JSON (StorageError, one line, when it cannot be written)."""
    path = Path(path)
    make_parent_dir(path)
    atomic_write_text(path, json.dumps(report, indent=2, default=str) + "\n")
    return path


def format_report(report: dict) -> str:
    """The report as plain text for the terminal."""
    lines = [f"data: {report['data']}" + (f" ({report['format']})" if "format" in report else "")]
    if report.get("val_data"):
        lines.append(f"validation data: {report['val_data']}")
    if "split" in report:
        lines.append(f"split: {report['split']}")
    for role, rep in report.get("splits", {}).items():
        im, cap = rep["images"], rep["captions"]
        lines += ["", f"[{role}] {rep['name']}",
                  f"  images: {im['listed']} listed, {im['with_captions']} with captions, {im['found']} found, "
                  f"{im['readable']} readable; {im['missing']['count']} missing, {im['unreadable']['count']} "
                  f"unreadable, {im['odd']['count']} oddly encoded, {im['without_captions']['count']} without captions"]
        for ex in (im["missing"]["examples"][:3] + im["unreadable"]["examples"] + im["odd"]["examples"]
                   + [f"{p}: no usable caption" for p in im["without_captions"]["examples"][:3]]):
            lines.append(f"    {ex}")
        pi = cap["per_image"]
        lines.append(f"  captions: {cap['kept']} kept, per image min/median/max {pi['min']}/{pi['median']:g}/{pi['max']}")
        if cap["dropped"]:
            lines.append("  dropped captions: " + _reasons(cap["dropped"]))
            for exs in cap["dropped_examples"].values():
                for ex in exs[:2]:
                    lines.append(f"    {ex}")
        d = cap["duplicates"]
        lines.append(f"  duplicate captions: {d['captions']} repeats of {d['texts']} texts "
                     f"({d['across_images']} shared by different images)")
        tok = rep.get("tokens")
        if tok:
            lines.append(f"  tokens ({tok['encoder']}): min/median/p95/max {tok['min']}/{tok['median']}/"
                         f"{tok['p95']}/{tok['max']}; {tok['truncated']} over the limit of {tok['limit']}")
        for entry in rep.get("prepared", []):
            lines.append(f"  prepared images: {entry['path']}: {entry['status']} ({entry['checked']} checked)")
    if "leak" in report:
        lk = report["leak"]
        lines += ["", f"train/val leak: {lk['images_in_both']} validation image(s) also in train (by content hash)"]
        lines += [f"    {ex}" for ex in lk["examples"]]
    lines.append("")
    lines += [f"ERROR: {e}" for e in report["errors"]]
    lines += [f"warning: {w}" for w in report["warnings"]]
    lines.append("OK: nothing would spoil training" if report["ok"] else
                 f"NOT OK: {len(report['errors'])} problem(s) would spoil training")
    return "\n".join(lines)
