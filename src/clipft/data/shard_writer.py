"""Writing webdataset shards (`clipft shard`): every split of a dataset clipft reads, as
OUT/<split>-000000.tar ... with `{key}.jpg`, `{key}.txt` (one caption per line) and `{key}.json`
(image id, split, source path, caption ids), a wids index per split and one sizes file. Images are
resized once (short side `image_size`, never upscaled). Reading shards is `shards.py`'s job."""

from __future__ import annotations

import io
import json
import logging
import time
from pathlib import Path
from typing import Sequence

from ..config import DataConfig
from .records import CaptionedImages
from .shards import SHARD_INDEX, SIZES, VAL_INDEX
from .splits import load_split

log = logging.getLogger(__name__)


def _shard_image(path: Path, size: int) -> tuple[bytes | None, str | None]:
    """JPEG bytes of an image, short side resized to `size` (never upscaled); a JPEG already that
    small is kept byte for byte. (None, reason) when it cannot be read."""
    from PIL import Image
    from .images import load_image
    try:
        with open(path, "rb") as f:
            raw = f.read()
        with Image.open(io.BytesIO(raw)) as im:
            if im.format == "JPEG" and im.mode == "RGB" and min(im.size) <= size:
                im.load()  # a truncated file fails here, not in training
                return raw, None
    except Exception:
        pass  # load_image below says why
    img, reason = load_image(path, draft_size=size)
    if img is None:
        return None, reason
    w, h = img.size
    if min(w, h) > size:
        scale = size / min(w, h)
        img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95)
    return buf.getvalue(), None


def write_split_shards(split: CaptionedImages, out: Path, prefix: str, shard_size: int = 1000,
                       image_size: int = 256) -> dict:
    """One split as OUT/PREFIX-000000.tar... plus its wids index (shards.json for train, shards-val.json
    for val, shards-PREFIX.json otherwise). {"shards", "counts", "samples", "bad", "seconds"}."""
    import webdataset as wds
    for old in out.glob(f"{prefix}-*.tar"):
        old.unlink()
    counts: list[int] = []
    bad = 0
    t0 = time.time()
    with wds.ShardWriter(str(out / f"{prefix}-%06d.tar"), maxcount=shard_size, verbose=0) as sink:
        for i, rec in enumerate(split.images):
            data, _reason = _shard_image(rec.path, image_size)
            if data is None:
                bad += 1
                continue
            if not counts or counts[-1] == shard_size:
                counts.append(0)
            counts[-1] += 1
            sink.write({"__key__": f"{i:09d}", "jpg": data, "txt": "\n".join(rec.captions),
                        "json": {"image_id": rec.image_id, "split": prefix, "source": str(rec.path),
                                 "caption_ids": rec.caption_ids}})
    names = [f"{prefix}-{k:06d}.tar" for k in range(len(counts))]
    index = {"__kind__": "wids-shard-index-v1", "wids_version": 1, "name": prefix,
             "shardlist": [{"url": n, "nsamples": c, "filesize": (out / n).stat().st_size}
                           for n, c in zip(names, counts)]}
    index_name = SHARD_INDEX if prefix == "train" else VAL_INDEX if prefix == "val" else f"shards-{prefix}.json"
    (out / index_name).write_text(json.dumps(index, indent=1) + "\n")
    if bad:
        log.warning("%s: %d unreadable image(s) skipped", split.name, bad)
    return {"shards": names, "counts": counts, "samples": sum(counts), "bad": bad, "seconds": time.time() - t0}


def write_shards(root: str | Path, cfg: DataConfig, out: str | Path, shard_size: int = 1000,
                 image_size: int = 256, splits: Sequence[str] | None = None, progress: bool = False) -> dict:
    """Every split of a dataset clipft reads into webdataset shards under `out` (see the module doc).
    Returns {split: {"shards": [...], "samples": n, "bad": n}}."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    splits = list(splits or (cfg.train_split, cfg.val_split))
    loaded = [(name, load_split(root, name, cfg)) for name in splits]  # bad data fails before writing
    try:  # other shard sets already in `out` keep their entries
        sizes: dict[str, int] = {k: v for k, v in json.loads((out / SIZES).read_text()).items() if (out / k).is_file()}
    except (OSError, ValueError, AttributeError):
        sizes = {}
    report: dict[str, dict] = {}
    for name, split in loaded:
        prefix = "val" if name == cfg.val_split else "train" if name == cfg.train_split else name
        sizes = {k: v for k, v in sizes.items() if not k.startswith(f"{prefix}-")}
        report[name] = write_split_shards(split, out, prefix, shard_size, image_size)
        sizes.update(zip(report[name]["shards"], report[name]["counts"]))
    (out / SIZES).write_text(json.dumps(sizes, indent=1) + "\n")
    return report
