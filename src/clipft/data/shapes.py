"""Embedded synthetic dataset: coloured shapes on a plain background, in the COCO 2014 layout.

`make_shapes_dataset` writes exactly what `clipft.data.load_coco_captions` reads:

    out/train2014/COCO_train2014_{id:012d}.jpg
    out/val2014/COCO_val2014_{id:012d}.jpg
    out/annotations/captions_{train,val}2014.json        standard COCO captions
    out/annotations/shapes_labels_{train,val}2014.json   {"<image id>": [{"shape", "color", "size", "position"}]}

Every image holds 1-3 shapes (one per cell of a 3x3 grid, so they never overlap) and gets five
differently worded captions. Every caption names the colour and shape of *all* objects (so any
caption identifies its image as well as the picture allows); all but at most one also give
positions. The labels file is what zero-shot evaluation scores against.

Determinism: each image draws from its own `random.Random("shapes:{seed}:{split}:{index}")`
(string seeds are hashed with SHA-512, independent of PYTHONHASHSEED), so the same seed gives the
same bytes, and image k of a split does not depend on how many images the split has.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

from PIL import Image, ImageDraw

# Well-separated hues (plus black) that all contrast with a light neutral background; no white.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 30, 35),
    "orange": (245, 135, 20),
    "yellow": (240, 210, 25),
    "green": (35, 150, 50),
    "cyan": (20, 185, 210),
    "blue": (35, 60, 210),
    "purple": (135, 45, 170),
    "black": (25, 25, 25),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
SIZES: tuple[str, ...] = ("small", "large")
# Row-major 3x3 grid; the label of cell (row, col) is POSITIONS[3 * row + col].
POSITIONS: tuple[str, ...] = ("top left", "top", "top right",
                              "left", "center", "right",
                              "bottom left", "bottom", "bottom right")

# Object extent as a fraction of the image side: small ~1/6, large ~1/3 (a grid cell is 1/3).
_SIZE_FRAC = {"small": (0.15, 0.19), "large": (0.27, 0.31)}
_SUPERSAMPLE = 2  # draw at 2x and downsample: cheap antialiasing of the polygon edges
_JPEG_QUALITY = 90
VAL_ID_OFFSET = 1_000_000  # val image ids start above any train id, so ids are unique across splits
_CAPTIONS_PER_IMAGE = 5

_SHAPE_SYNONYMS = {
    "circle": ("circle", "disk", "round shape"),
    "square": ("square", "box", "block"),
    "triangle": ("triangle", "triangular shape"),
    "star": ("star", "five-pointed star"),
    "cross": ("cross", "plus sign"),
}
_SIZE_SYNONYMS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
_COUNT_WORDS = {1: "one", 2: "two", 3: "three"}


# --------------------------------------------------------------------------- drawing


def _shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Vertices of a polygonal shape centred on (cx, cy) that fits a box of half-side r."""
    if shape == "square":
        s = r * 0.9  # a full-box square looks much heavier than the circle of the same extent
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)]
    if shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * 0.45
            ang = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + rad * math.cos(ang), cy + rad * math.sin(ang)))
        return pts
    if shape == "cross":
        w = r / 3  # arm half-width
        return [(cx - w, cy - r), (cx + w, cy - r), (cx + w, cy - w), (cx + r, cy - w),
                (cx + r, cy + w), (cx + w, cy + w), (cx + w, cy + r), (cx - w, cy + r),
                (cx - w, cy + w), (cx - r, cy + w), (cx - r, cy - w), (cx - w, cy - w)]
    raise ValueError(f"unknown shape {shape!r}")


def _sample_objects(rng: random.Random) -> list[dict[str, str]]:
    """1-3 objects in distinct grid cells with distinct (colour, shape) pairs."""
    n = rng.randint(1, 3)
    cells = rng.sample(range(9), n)
    pairs: set[tuple[str, str]] = set()
    objects = []
    for cell in cells:
        while True:
            color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
            if (color, shape) not in pairs:  # keeps every caption unambiguous about which is which
                break
        pairs.add((color, shape))
        objects.append({"shape": shape, "color": color, "size": rng.choice(SIZES),
                        "position": POSITIONS[cell]})
    return objects


def _render(objects: list[dict[str, str]], rng: random.Random, image_size: int) -> Image.Image:
    """Draw the objects on a light, slightly tinted background (RGB, image_size x image_size)."""
    big = image_size * _SUPERSAMPLE
    grey = rng.randint(205, 240)
    bg = tuple(min(255, max(0, grey + rng.randint(-8, 8))) for _ in range(3))
    img = Image.new("RGB", (big, big), bg)
    draw = ImageDraw.Draw(img)
    cell = big / 3
    for obj in objects:
        idx = POSITIONS.index(obj["position"])
        row, col = divmod(idx, 3)
        lo, hi = _SIZE_FRAC[obj["size"]]
        extent = rng.uniform(lo, hi) * big
        r = extent / 2
        # Jitter the centre but keep the object inside its own cell (no overlaps, position stays true).
        slack = max(0.0, (cell - extent) / 2 - 0.02 * big)
        cx = (col + 0.5) * cell + rng.uniform(-slack, slack)
        cy = (row + 0.5) * cell + rng.uniform(-slack, slack)
        fill = tuple(min(255, max(0, c + rng.randint(-10, 10))) for c in COLORS[obj["color"]])
        if obj["shape"] == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        else:
            draw.polygon(_shape_polygon(obj["shape"], cx, cy, r), fill=fill)
    return img.resize((image_size, image_size), Image.Resampling.BOX)


# --------------------------------------------------------------------------- captions


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _join(parts: list[str], rng: random.Random) -> str:
    if len(parts) == 1:
        return parts[0]
    if len(parts) == 2:
        return f"{parts[0]} and {parts[1]}"
    last = ", and " if rng.random() < 0.5 else " and "
    return ", ".join(parts[:-1]) + last + parts[-1]


def _canonical_position(pos: str) -> str:
    if pos == "center":
        return "in the center"
    if " " in pos:
        return f"in the {pos} corner"
    if pos in ("top", "bottom"):
        return f"at the {pos}"
    return f"on the {pos}"


def _position_phrase(pos: str, rng: random.Random) -> str:
    """A randomly worded prepositional phrase for a grid position."""
    if pos == "center":
        return rng.choice(("in the center", "in the middle", "at the center"))
    if " " in pos:  # corner
        v, h = pos.split()
        v = rng.choice(("top", "upper") if v == "top" else ("bottom", "lower"))
        return rng.choice((f"in the {v} {h} corner", f"at the {v} {h}", f"in the {v} {h}"))
    if pos in ("top", "bottom"):
        alt = "upper" if pos == "top" else "lower"
        return rng.choice((f"at the {pos}", f"near the {pos}", f"at the {pos} center",
                           f"in the {alt} middle"))
    return rng.choice((f"on the {pos}", f"on the {pos} side", f"at the {pos} edge",
                       f"in the middle of the {pos} side"))


def _captions(objects: list[dict[str, str]], rng: random.Random) -> list[str]:
    """Five distinct captions; each names colour + shape of every object (object order varies)."""

    def shuffled() -> list[dict[str, str]]:
        objs = list(objects)
        rng.shuffle(objs)
        return objs

    def size(o):
        return rng.choice(_SIZE_SYNONYMS[o["size"]])

    def shape(o):
        return rng.choice(_SHAPE_SYNONYMS[o["shape"]])

    def canonical():  # canonical words only: the caption the labels are checked against
        return _join([f"{_a(o['size'])} {o['color']} {o['shape']} {_canonical_position(o['position'])}"
                      for o in shuffled()], rng)

    def there_is():
        return "there is " + _join([f"{_a(size(o))} {o['color']} {shape(o)} "
                                    f"{_position_phrase(o['position'], rng)}" for o in shuffled()], rng)

    def showing():  # the only template without positions
        prefix = rng.choice(("an image showing", "a picture of", "a drawing of", "a simple image with"))
        return f"{prefix} " + _join([_a(f"{o['color']} {shape(o)}") for o in shuffled()], rng)

    def position_first():
        return ", ".join(f"{_position_phrase(o['position'], rng)} {_a(o['color'])} {shape(o)}"
                         for o in shuffled())

    def counted():
        if len(objects) == 1:
            o = objects[0]
            return (f"a single {size(o)} {o['color']} {shape(o)} {_position_phrase(o['position'], rng)} "
                    f"on a plain background")
        return (f"{_COUNT_WORDS[len(objects)]} shapes on a plain background: "
                + _join([f"{_a(o['color'])} {shape(o)} {_position_phrase(o['position'], rng)}"
                         for o in shuffled()], rng))

    def located():
        verb = rng.choice(("located", "placed", "positioned", "sitting"))
        return _join([f"{_a(o['color'])} {shape(o)} {verb} {_position_phrase(o['position'], rng)}"
                      for o in shuffled()], rng)

    def terse():
        return "; ".join(f"{size(o)} {o['color']} {o['shape']}, {o['position']}" for o in shuffled())

    # Every template starts differently (article+size / "there is" / prefix / preposition / count
    # / article+colour / bare size word), so the five captions are distinct by construction.
    others = [there_is, showing, position_first, counted, located, terse]
    chosen = [canonical] + rng.sample(others, _CAPTIONS_PER_IMAGE - 1)
    rng.shuffle(chosen)
    caps = [f() for f in chosen]
    assert len(set(caps)) == len(caps), caps  # pragma: no cover - guaranteed by the templates
    return caps


# --------------------------------------------------------------------------- dataset


def _write_split(out: Path, split: str, n: int, seed: int, image_size: int, id_offset: int) -> None:
    img_dir = out / f"{split}2014"
    img_dir.mkdir(parents=True, exist_ok=True)
    images, annotations, labels = [], [], {}
    for index in range(n):
        rng = random.Random(f"shapes:{seed}:{split}:{index}")
        image_id = id_offset + index + 1
        file_name = f"COCO_{split}2014_{image_id:012d}.jpg"
        objects = _sample_objects(rng)
        _render(objects, rng, image_size).save(img_dir / file_name, format="JPEG",
                                               quality=_JPEG_QUALITY)
        images.append({"id": image_id, "file_name": file_name, "width": image_size,
                       "height": image_size})
        for k, caption in enumerate(_captions(objects, rng)):
            # image ids are unique across splits, so image_id * 10 + k is too
            annotations.append({"id": image_id * 10 + k, "image_id": image_id, "caption": caption})
        labels[str(image_id)] = objects
    info = {"description": "clipft synthetic shapes (COCO 2014 caption layout)",
            "version": "1.0", "seed": seed, "split": split, "image_size": image_size}
    ann_dir = out / "annotations"
    (ann_dir / f"captions_{split}2014.json").write_text(json.dumps(
        {"info": info, "licenses": [], "images": images, "annotations": annotations}))
    (ann_dir / f"shapes_labels_{split}2014.json").write_text(json.dumps(labels))


def make_shapes_dataset(out: Path, n_train: int = 2000, n_val: int = 500, seed: int = 0,
                        image_size: int = 128) -> Path:
    """Write the synthetic shapes dataset in COCO 2014 layout under `out`; returns `out`.

    Train image ids are 1..n_train, val ids VAL_ID_OFFSET+1..; caption ids are image_id*10+k.
    Existing files with the same names are overwritten.
    """
    if n_train < 0 or n_val < 0:
        raise ValueError(f"n_train and n_val must be >= 0, got {n_train}, {n_val}")
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16, got {image_size}")
    out = Path(out)
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    _write_split(out, "train", n_train, seed, image_size, id_offset=0)
    _write_split(out, "val", n_val, seed, image_size, id_offset=VAL_ID_OFFSET)
    return out


def load_shapes_labels(root: str | Path, split: str) -> dict[int, list[dict[str, str]]]:
    """The per-image object labels written by `make_shapes_dataset`, keyed by int image id."""
    path = Path(root) / "annotations" / f"shapes_labels_{split}2014.json"
    return {int(k): v for k, v in json.loads(path.read_text()).items()}
