"""benchmarks/real_photos.py: the Qt rcc reader on small resource files written here in the real format
(versions 1-3, plain and zlib-compressed entries, nested folders), one-line errors for files that are not
rcc, the labels, captions, split and CSV; and, where the Debian package gcompris-qt-data is installed,
its real resource files."""

from __future__ import annotations

import csv
import importlib.util
import io
import struct
import sys
import zlib
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "real_photos.py"


@pytest.fixture(scope="module")
def rp():
    spec = importlib.util.spec_from_file_location("real_photos", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    try:
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.modules.pop(spec.name, None)


def qt_hash(name: str) -> int:
    """qt_hash of rcc.cpp (the value is stored, never checked by the reader)."""
    h = 0
    for ch in name:
        h = ((h << 4) + ord(ch)) & 0xFFFFFFFF
        h ^= (h & 0xF0000000) >> 23
        h &= 0x0FFFFFFF
    return h


def write_rcc(files: dict[str, tuple[bytes, bool]], version: int = 3) -> bytes:
    """A Qt resource file as rcc writes it: header, data, names, tree (directories breadth first, each one's
    children contiguous). files: path -> (content, compress with qCompress)."""
    root: dict = {}
    for path, spec in files.items():
        *dirs, leaf = path.split("/")
        node = root
        for d in dirs:
            node = node.setdefault(d, {})
        node[leaf] = spec
    nodes = [("", root)]  # breadth-first list of (name, dict-or-file)
    first_child = {}
    i = 0
    while i < len(nodes):
        name, item = nodes[i]
        if isinstance(item, dict):
            first_child[i] = len(nodes)
            nodes.extend(sorted(item.items()))
        i += 1
    names, name_off = b"", {}
    data, data_off = b"", {}
    for idx, (name, item) in enumerate(nodes):
        if idx and name not in name_off:
            name_off[name] = len(names)
            names += struct.pack(">HI", len(name), qt_hash(name)) + name.encode("utf-16-be")
        if not isinstance(item, dict):
            content, compress = item
            blob = struct.pack(">I", len(content)) + zlib.compress(content) if compress else content
            data_off[idx] = len(data)
            data += struct.pack(">I", len(blob)) + blob
    header_size = 24 if version >= 3 else 20
    data_start = header_size
    names_start = data_start + len(data)
    tree_start = names_start + len(names)
    tree = b""
    for idx, (name, item) in enumerate(nodes):
        noff = name_off.get(name, 0) if idx else 0
        if isinstance(item, dict):
            tree += struct.pack(">IHII", noff, 0x2, len(item), first_child[idx])
        else:
            tree += struct.pack(">IHHHI", noff, 0x1 if item[1] else 0x0, 0, 0, data_off[idx])
        if version >= 2:
            tree += struct.pack(">Q", 0)  # last modified
    header = b"qres" + struct.pack(">IIII", version, tree_start, data_start, names_start)
    if version >= 3:
        header += struct.pack(">I", 0)
    return header + data + names + tree


@pytest.mark.parametrize("version", [1, 2, 3])
def test_rcc_reader_reads_plain_and_compressed_files_in_nested_folders(rp, version):
    files = {"gcompris/src/activities/erase/resource/giraffe.webp": (b"RIFF....WEBPgiraffe" * 40, False),
             "gcompris/src/activities/erase/Erase.qml": (b"import QtQuick 2.12\n" * 30, True),
             "gcompris/src/activities/erase/resource/sub/kitten.webp": (bytes(range(256)) * 3, True),
             "top.txt": (b"", False)}
    out = rp.read_rcc(write_rcc(files, version))
    assert out == {k: v for k, (v, _) in files.items()}


def test_rcc_reader_refuses_what_is_not_a_readable_rcc_in_one_line(rp):
    with pytest.raises(rp.RccError, match=r"x\.rcc: not a Qt resource file"):
        rp.read_rcc(b"PK\x03\x04 a zip file", "x.rcc")
    good = write_rcc({"a/b.webp": (b"abc" * 100, True)})
    with pytest.raises(rp.RccError, match=r"x\.rcc: .*(truncated|past the end)"):
        rp.read_rcc(good[:30], "x.rcc")
    with pytest.raises(rp.RccError, match="version 9"):
        rp.read_rcc(b"qres" + struct.pack(">IIII", 9, 0, 0, 0), "x.rcc")
    # a compressed entry whose size field lies
    bad = write_rcc({"a.webp": (b"abc" * 100, True)})
    at = bad.index(struct.pack(">I", 300))
    bad = bad[:at] + struct.pack(">I", 301) + bad[at + 4:]
    with pytest.raises(rp.RccError, match="a.webp: decompressed to 300 bytes, header says 301"):
        rp.read_rcc(bad, "x.rcc")


def test_labels_and_captions_from_file_names(rp):
    assert rp.label_from_name("leaningTowerOfPisa") == "leaning tower of pisa"
    assert rp.label_from_name("hammer7") == "hammer"
    assert rp.label_from_name("red_panda") == "red panda"
    assert rp.label_from_name("canyondeChelly") == "canyon de chelly"
    assert rp.label_from_name("gatewayofIndia") == "gateway of india"
    assert rp.label_from_name("solar3") == "solar panel"
    caps = rp.captions_for("owl", "a farm animal")
    assert len(caps) == 5 and len(set(caps)) == 5
    assert "a photo of an owl." in caps and "an owl, a farm animal." in caps and "An owl." in caps
    assert "a photo of the eiffel tower." in rp.captions_for("eiffel tower", "a monument", "the")
    assert not any("a fish, a fish" in c for c in rp.captions_for("fish", "a fish"))


def test_split_is_seeded_disjoint_and_complete_and_csv_reads_back(rp, tmp_path):
    names = [f"img{i}.jpg" for i in range(40)]
    train, val = rp.split_images(names, 0.25, seed=0)
    assert (train, val) == rp.split_images(list(reversed(names)), 0.25, seed=0)
    assert not set(train) & set(val) and sorted(train + val) == sorted(names) and len(val) == 10
    assert rp.split_images(names, 0.25, seed=1)[1] != val
    rows = [("images/a b.jpg", 'a "quoted", caption'), ("images/c.jpg", "plain")]
    rp.write_csv(tmp_path / "t.csv", rows)
    with open(tmp_path / "t.csv", newline="") as f:
        assert [tuple(r) for r in csv.reader(f)] == [("image", "caption"), *rows]


def test_rgb_conversion_puts_transparency_on_white_and_bounds_the_side(rp):
    from PIL import Image
    im = Image.new("RGBA", (400, 100), (255, 0, 0, 0))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    out = rp.to_rgb(buf.getvalue(), 200)
    assert out.mode == "RGB" and out.size == (200, 50) and out.getpixel((10, 10)) == (255, 255, 255)


@pytest.mark.skipif(not Path("/usr/share/gcompris-qt/rcc/lang.rcc").is_file(),
                    reason="Debian package gcompris-qt-data not installed")
def test_the_real_package_yields_labelled_photos(rp):
    pictures = rp.collect(rp.RCC_DIR)
    assert len(pictures) > 300
    by = {(p["activity"], p["name"]): p for p in pictures}
    gorilla = by[("lang", "gorilla")]
    assert gorilla["label"] == "gorilla" and rp.to_rgb(gorilla["bytes"], 64).mode == "RGB"
    assert by[("explore_monuments", "eiffelTower")]["category"] == "a monument"
