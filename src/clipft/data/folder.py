"""Image folders: a directory tree of images, each with a same-stem .txt holding one caption per line."""

from __future__ import annotations

from pathlib import Path

from ..config import DataConfig
from .records import IMAGE_EXTENSIONS, CaptionedImages, DataError, Entry, group_entries, walk_files


def has_images(path: Path) -> bool:
    """A directory with at least one image file in it or its sub-folders."""
    return path.is_dir() and any(p.suffix.lower() in IMAGE_EXTENSIONS for p in walk_files(path))


def load_folder_captions(root: str | Path, cfg: DataConfig | None = None) -> CaptionedImages:
    """A directory tree of images (sub-folders walked), each with a same-stem .txt beside it holding
    one caption per line. Images without a .txt and .txt files without an image are counted."""
    root = Path(root)
    images: list[Path] = []
    texts: dict[Path, Path] = {}  # path without suffix -> .txt file
    for p in walk_files(root):
        ext = p.suffix.lower()
        if ext in IMAGE_EXTENSIONS:
            images.append(p)
        elif ext == ".txt":
            texts[p.with_suffix("")] = p
    if not images:
        raise DataError(f"{root}: no image files ({', '.join(IMAGE_EXTENSIONS)}) found in the folder or "
                        "its sub-folders")

    def lines_of(txt: Path) -> list[str] | None:
        try:
            return txt.read_bytes().decode("utf-8-sig").splitlines()
        except UnicodeDecodeError:
            return None
        except OSError:
            return None

    entries: list[Entry] = []
    used: set[Path] = set()
    for img in images:
        txt = texts.get(img.with_suffix(""))
        if txt is None:
            continue  # stays in extra_images: an image without captions
        used.add(txt)
        lines = lines_of(txt)
        if lines is None:
            entries.append(Entry(img, None, str(txt), reason="not_utf8"))
            continue
        entries.extend(Entry(img, line, f"{txt}:{k}") for k, line in enumerate(lines, 1))
    for txt in texts.values():
        if txt not in used:
            lines = lines_of(txt) or []
            entries.extend(Entry(None, line, f"{txt}:{k}", reason="no_image") for k, line in enumerate(lines, 1)
                           if line.strip())
    return group_entries(entries, f"folder:{root}", root, extra_images=images)
