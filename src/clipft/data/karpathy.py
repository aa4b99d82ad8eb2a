"""Karpathy's split files: `dataset_coco.json`, `dataset_flickr8k.json`, `dataset_flickr30k.json`.

One schema for the three: {"dataset": "flickr30k", "images": [{"filename": "1000092795.jpg",
"imgid": 0, "split": "train" | "val" | "test" | "restval", "sentences": [{"raw": "Two young guys ...",
"sentid": 0, ...}, ...], ...}, ...]}. The COCO file adds "filepath" ("train2014" / "val2014") and
"cocoid". `read_karpathy_split` parses and validates one split; where the images live is the
caller's business (COCO: ROOT/filepath/filename; Flickr: the image folder of the layout).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .records import DataError, is_int, read_json

KARPATHY_SPLITS = ("test", "val", "train", "restval")  # the values of `split` in the files


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
