"""COCO 2014 captions: ROOT/annotations/captions_{split}2014.json + ROOT/{split}2014/.

The layout has its own splits (train, val), so the loader takes the split name.
"""

from __future__ import annotations

from pathlib import Path

from .records import (CaptionedImages, DataError, ImageRecord, caption_problem, is_int, log_drops, note_problem,
                      read_json)


def coco_annotation_path(root: str | Path, split: str) -> Path:
    """ROOT/annotations/captions_{split}2014.json"""
    return Path(root) / "annotations" / f"captions_{split}2014.json"



def is_coco_root(path: Path) -> bool:
    """A directory holding annotations/captions_<split>2014.json (what auto-detection looks for)."""
    return path.is_dir() and any((path / "annotations").glob("captions_*2014.json"))


def load_coco_captions(root: str | Path, split: str) -> CaptionedImages:
    """Parse and validate ROOT/annotations/captions_{split}2014.json; images in ROOT/{split}2014/.

    Images are ordered by image id, captions by annotation id (independent of file order).
    Caption whitespace is stripped; empty captions and images left without captions are
    dropped and counted. Image files are not opened here.
    """
    root = Path(root)
    path = coco_annotation_path(root, split)
    data = read_json(path)
    if not isinstance(data, dict):
        raise DataError(f"{path}: top level is a JSON {type(data).__name__}, expected an object "
                        "with 'images' and 'annotations'")
    for key in ("images", "annotations"):
        if key not in data:
            raise DataError(f"{path}: missing '{key}' list")
        if not isinstance(data[key], list):
            raise DataError(f"{path}: '{key}' is a JSON {type(data[key]).__name__}, expected a list")

    files: dict[int, str] = {}
    for k, entry in enumerate(data["images"]):
        if not isinstance(entry, dict):
            raise DataError(f"{path}: images[{k}] is not an object")
        if not is_int(entry.get("id")):
            raise DataError(f"{path}: images[{k}] has no integer 'id' (got {entry.get('id')!r})")
        if not isinstance(entry.get("file_name"), str) or not entry["file_name"]:
            raise DataError(f"{path}: images[{k}] (id {entry['id']}) has no string 'file_name'")
        if entry["id"] in files:
            raise DataError(f"{path}: images[{k}]: duplicate image id {entry['id']}")
        files[entry["id"]] = entry["file_name"]

    per_image: dict[int, list[tuple[int, str]]] = {i: [] for i in files}
    seen_ids: set[int] = set()
    problems: dict[str, int] = {}
    examples: dict[str, list[str]] = {}
    for k, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict):
            raise DataError(f"{path}: annotations[{k}] is not an object")
        for key in ("id", "image_id", "caption"):
            if key not in ann:
                raise DataError(f"{path}: annotations[{k}] has no '{key}'")
        if not is_int(ann["id"]):
            raise DataError(f"{path}: annotations[{k}]: 'id' is not an integer (got {ann['id']!r})")
        if ann["id"] in seen_ids:
            raise DataError(f"{path}: annotations[{k}]: duplicate annotation id {ann['id']}")
        seen_ids.add(ann["id"])
        if not is_int(ann["image_id"]) or ann["image_id"] not in per_image:
            raise DataError(f"{path}: annotations[{k}] (id {ann['id']}): image_id "
                            f"{ann['image_id']!r} is not in 'images'")
        if not isinstance(ann["caption"], str):
            raise DataError(f"{path}: annotations[{k}] (id {ann['id']}): caption is a "
                            f"{type(ann['caption']).__name__}, expected a string")
        reason = caption_problem(ann["caption"])
        if reason is not None:
            note_problem(problems, examples, reason, f"annotation id {ann['id']}: {ann['caption']!r}")
            continue
        per_image[ann["image_id"]].append((ann["id"], ann["caption"].strip()))

    img_dir = root / f"{split}2014"
    if files and not img_dir.is_dir():
        raise DataError(f"{img_dir}: image directory not found (annotations: {path})")
    images, dropped_images = [], 0
    for image_id in sorted(per_image):
        caps = sorted(per_image[image_id])
        if not caps:
            dropped_images += 1
            note_problem({}, examples, "image_without_caption", str(img_dir / files[image_id]))
            continue
        images.append(ImageRecord(image_id=image_id, path=img_dir / files[image_id],
                                  captions=[c for _, c in caps], caption_ids=[i for i, _ in caps]))
    if not images:
        raise DataError(f"{path}: no image has a caption")
    out = CaptionedImages(images=images, name=f"coco:{root}:{split}", dropped_images=dropped_images,
                          dropped_captions=sum(problems.values()), caption_problems=problems,
                          examples=examples)
    log_drops(path, out)
    return out

