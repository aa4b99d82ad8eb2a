"""Karpathy's split files: `dataset_coco.json`, `dataset_flickr8k.json`, `dataset_flickr30k.json`.

One schema for the three: {"dataset": "flickr30k", "images": [{"filename": "1000092795.jpg",
"imgid": 0, "split": "train" | "val" | "test" | "restval", "sentences": [{"raw": "Two young guys ...",
"sentid": 0, ...}, ...], ...}, ...]}. The COCO file adds "filepath" ("train2014" / "val2014") and
"cocoid". `read_karpathy_split` parses and validates one split; where the images live is the
caller's business (COCO: ROOT/filepath/filename; Flickr: the image folder of the layout).

On a COCO root, `load_coco_split` also reads the split names karpathy-train / karpathy-val /
karpathy-test / karpathy-restval from ROOT/dataset_coco.json (or ROOT/annotations/dataset_coco.json):
`data.val_split: karpathy-val` selects checkpoints on Karpathy's val split, which shares no image
with Karpathy's test split (a seeded subset of val2014 does: Karpathy drew both from val2014).
Without the file, karpathy-val falls back to val2014 (with data.val_images, as before) and warns
that Karpathy test figures of such a run may not be comparable.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from .coco import load_coco_captions
from .records import CaptionedImages, DataError, ImageRecord, is_int, read_json

log = logging.getLogger(__name__)

KARPATHY_SPLITS = ("test", "val", "train", "restval")  # the values of `split` in the files
KARPATHY_PREFIX = "karpathy-"  # split names "karpathy-val", ... (data.val_split, evaluate --split)
COCO_KARPATHY_FILE = "dataset_coco.json"


@dataclass
class KarpathyImage:
    """One image of a split as the file lists it (position = its index in the file's 'images')."""
    position: int
    image_id: int  # cocoid (COCO) or imgid (Flickr)
    filepath: str | None  # COCO's sub-folder; None in the Flickr files
    filename: str
    captions: list[str]
    caption_ids: list[int]


@dataclass
class KarpathySplit:
    images: list[KarpathyImage]  # file order
    dropped_images: int  # images of the split left without a non-empty caption
    dropped_captions: int  # empty captions


def read_karpathy_split(split_file: str | Path, split: str, id_key: str = "cocoid",
                        require_filepath: bool = True) -> KarpathySplit:
    """The images of one split (`split` field) of a Karpathy file, in file order.

    Image ids are `id_key` (falling back to "imgid"); caption ids are `sentid` when present (else
    id * 100 + position). Captions are the stripped `raw` strings; empty ones, and images left
    without captions, are dropped and counted. Schema errors are one-line DataErrors naming the entry.
    """
    split_file = Path(split_file)
    if split not in KARPATHY_SPLITS:
        raise DataError(f"{split_file}: unknown Karpathy split {split!r} (known: {', '.join(KARPATHY_SPLITS)})")
    data = read_json(split_file)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataError(f"{split_file}: expected an object with an 'images' list (Karpathy's split file)")
    keys = ("filepath", "filename") if require_filepath else ("filename",)
    out: list[KarpathyImage] = []
    seen: set[int] = set()
    dropped_images = dropped_captions = 0
    for k, entry in enumerate(data["images"]):
        if not isinstance(entry, dict):
            raise DataError(f"{split_file}: images[{k}] is not an object")
        if entry.get("split") != split:
            continue
        for key in keys:
            if not isinstance(entry.get(key), str) or not entry[key]:
                raise DataError(f"{split_file}: images[{k}] has no string '{key}'")
        image_id = entry.get(id_key, entry.get("imgid"))
        if not is_int(image_id):
            raise DataError(f"{split_file}: images[{k}] ({entry['filename']}) has no integer '{id_key}'")
        if image_id in seen:
            raise DataError(f"{split_file}: images[{k}]: duplicate {id_key} {image_id}")
        seen.add(image_id)
        sentences = entry.get("sentences")
        if not isinstance(sentences, list):
            raise DataError(f"{split_file}: images[{k}] ({id_key} {image_id}) has no 'sentences' list")
        caps, ids = [], []
        for j, s in enumerate(sentences):
            if not isinstance(s, dict) or not isinstance(s.get("raw"), str):
                raise DataError(f"{split_file}: images[{k}].sentences[{j}] ({id_key} {image_id}) has no string 'raw'")
            raw = s["raw"].strip()
            if not raw:
                dropped_captions += 1
                continue
            caps.append(raw)
            ids.append(s["sentid"] if is_int(s.get("sentid")) else image_id * 100 + j)
        if not caps:
            dropped_images += 1
            continue
        out.append(KarpathyImage(k, image_id, entry.get("filepath") if require_filepath else None,
                                 entry["filename"], caps, ids))
    if not out:
        raise DataError(f"{split_file}: no image with split == {split!r} and a caption")
    return KarpathySplit(out, dropped_images, dropped_captions)


def find_coco_karpathy_file(root: str | Path) -> Path | None:
    """ROOT/dataset_coco.json or ROOT/annotations/dataset_coco.json (where `clipft download --karpathy`
    and the caption_datasets.zip copies put it), or None."""
    root = Path(root)
    for f in (root / COCO_KARPATHY_FILE, root / "annotations" / COCO_KARPATHY_FILE):
        if f.is_file():
            return f
    return None


def coco_karpathy_images(split_file: str | Path, image_root: str | Path, split: str = "test",
                         order: str = "id") -> CaptionedImages:
    """Karpathy's `dataset_coco.json` -> the images of one split (`split` field), as CaptionedImages.

    Image path = image_root / filepath / filename. Images are ordered by cocoid (order="id") or
    as the file lists them (order="file": the order the 1K-test folds are cut in); captions keep
    the file's order; caption ids are `sentid` when present (else cocoid * 100 + position).
    Image files are not opened (unreadable ones are skipped later and counted), but every
    `filepath` directory must exist, so a wrong --data fails here and not as 5,000 warnings.
    """
    split_file, image_root = Path(split_file), Path(image_root)
    ks = read_karpathy_split(split_file, split, id_key="cocoid")
    for d in sorted({im.filepath for im in ks.images}):
        if not (image_root / d).is_dir():
            raise DataError(f"{image_root / d}: image directory not found (named by 'filepath' in {split_file}; "
                            "--data must be the folder that holds train2014/ and val2014/)")
    images = [ImageRecord(image_id=im.image_id, path=image_root / im.filepath / im.filename,
                          captions=im.captions, caption_ids=im.caption_ids) for im in ks.images]
    if order == "id":
        images.sort(key=lambda r: r.image_id)
    if ks.dropped_images or ks.dropped_captions:
        log.warning("%s: dropped %d image(s) without captions and %d empty caption(s)",
                    split_file, ks.dropped_images, ks.dropped_captions)
    return CaptionedImages(images=images, name=f"karpathy:{split_file}:{split}",
                           dropped_images=ks.dropped_images, dropped_captions=ks.dropped_captions)


def load_coco_split(root: str | Path, split: str) -> CaptionedImages:
    """A split of a COCO root: train / val (captions_<split>2014.json), or karpathy-<split> from the
    root's Karpathy file (see the module docstring; karpathy-val falls back to val2014 without it)."""
    if not split.startswith(KARPATHY_PREFIX):
        return load_coco_captions(root, split)
    part = split[len(KARPATHY_PREFIX):]
    split_file = find_coco_karpathy_file(root)
    if split_file is not None:
        return coco_karpathy_images(split_file, root, part)
    if part == "val":
        log.warning("%s: no %s (Karpathy's split file) in the root or annotations/: selecting checkpoints on "
                    "val2014 instead, which holds Karpathy's test images too; Karpathy test figures of this run "
                    "may not be comparable with published numbers (clipft download coco --karpathy fetches it)",
                    root, COCO_KARPATHY_FILE)
        return load_coco_captions(root, "val")
    raise DataError(f"{root}: split {split!r} needs Karpathy's {COCO_KARPATHY_FILE} in the root or annotations/")
