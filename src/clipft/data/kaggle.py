"""`clipft download coco|flickr8k|flickr30k --source kaggle`: the Kaggle copies people download,
fetched with `kagglehub` (the optional extra `clipft[kaggle]`) and laid out as the loaders read them.

  coco       jeffaudi/coco-2014-dataset-for-yolov3: coco2014/images/{train2014,val2014}/ (+ YOLO
             labels/); ROOT/train2014 and ROOT/val2014 become links to its image folders, and
             ROOT/annotations to its annotations/ folder when the copy has captions_*2014.json
  flickr8k   adityajn105/flickr8k: captions.txt + Images/ (read in place through links in ROOT)
  flickr30k  hsankesara/flickr-image-dataset: flickr30k_images/results.csv + flickr30k_images/flickr30k_images/

kagglehub keeps the files in its cache (~/.cache/kagglehub, or $KAGGLEHUB_CACHE) and fetches them
once; ROOT holds links to them plus clipft's own files (cache/, reports), so nothing is copied.
Credentials are kagglehub's: ~/.kaggle/kaggle.json, or KAGGLE_USERNAME and KAGGLE_KEY.

`download_kaggle(..., fetch=...)` takes the download function as an argument (default
`kagglehub.dataset_download`): tests pass one that returns a local folder laid out like the copy.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .download import DownloadError, NetworkError, RemoteFileError

log = logging.getLogger(__name__)

Fetch = Callable[[str], "str | os.PathLike[str]"]  # Kaggle handle -> local folder of the copy


class KaggleError(DownloadError):
    """kagglehub is missing, the credentials are, or Kaggle refused the request."""


class KaggleLayoutError(DownloadError):
    """The Kaggle copy is not laid out as expected (it may have changed since this was written)."""


@dataclass(frozen=True)
class KaggleCopy:
    handle: str
    what: str  # for messages


KAGGLE_COPIES = {
    "coco": KaggleCopy("jeffaudi/coco-2014-dataset-for-yolov3", "COCO 2014 (images, YOLO labels)"),
    "flickr8k": KaggleCopy("adityajn105/flickr8k", "Flickr8k (captions.txt + Images/)"),
    "flickr30k": KaggleCopy("hsankesara/flickr-image-dataset", "Flickr30k (results.csv + flickr30k_images/)"),
}
CREDENTIALS_HELP = ("put your Kaggle API token in ~/.kaggle/kaggle.json or set KAGGLE_USERNAME and KAGGLE_KEY "
                    "(kaggle.com > Settings > API > Create New Token)")


def kagglehub_fetch(handle: str) -> str:
    """kagglehub.dataset_download(handle): the local folder of the newest version."""
    try:
        import kagglehub
    except ImportError:
        raise KaggleError("kagglehub is not installed: pip install 'clipft[kaggle]' (or pip install kagglehub)") \
            from None
    return kagglehub.dataset_download(handle)


def _fetch(fetch: Fetch, copy: KaggleCopy) -> Path:
    """Run the download, turning kagglehub's and requests' failures into one-line errors."""
    try:
        path = Path(fetch(copy.handle))
    except DownloadError:
        raise
    except Exception as e:  # noqa: BLE001 - kagglehub raises its own classes and requests' ones
        name = type(e).__name__
        status = getattr(getattr(e, "response", None), "status_code", None)
        if name in ("UnauthenticatedError", "CredentialError") or status in (401, 403):
            raise KaggleError(f"kaggle {copy.handle}: not authorised ({status or name}): {CREDENTIALS_HELP}; "
                              "accept the dataset's terms on its Kaggle page if it asks") from None
        if name == "NotFoundError" or status == 404:
            raise RemoteFileError(f"kaggle {copy.handle}: dataset not found (HTTP 404): it may have been "
                                  "renamed or removed; download another copy and pass its folder with --data") from None
        if isinstance(e, OSError):  # requests.ConnectionError / Timeout are OSErrors too
            first = str(e).splitlines()[0][:160] if str(e) else name
            raise NetworkError(f"kaggle {copy.handle}: cannot reach kaggle.com ({first}): check the network or "
                               "proxy; on an offline machine, download on another one and copy the folder") from None
        raise
    if not path.is_dir():
        raise KaggleLayoutError(f"{path}: the Kaggle download of {copy.handle} is not a folder")
    return path


def _link(target: Path, link: Path, linked: list[str]) -> None:
    """link -> target, unless link already exists (left alone: it may be the user's own files)."""
    if link.is_symlink() and link.resolve() == target.resolve():
        return
    if link.exists() or link.is_symlink():
        log.warning("%s already exists; left as it is (not linked to %s)", link, target)
        return
    link.symlink_to(target.resolve(), target_is_directory=target.is_dir())
    linked.append(str(link))


def _listing(path: Path) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    return ", ".join(names[:12]) + (", ..." if len(names) > 12 else "") if names else "nothing"


def _layout_coco(src: Path, root: Path, linked: list[str]) -> None:
    base = src / "coco2014" if (src / "coco2014").is_dir() else src
    images = base / "images" if (base / "images").is_dir() else base
    missing = [s for s in ("train2014", "val2014") if not (images / s).is_dir()]
    if missing:
        raise KaggleLayoutError(f"{src}: expected coco2014/images/train2014/ and val2014/ in the Kaggle copy, found "
                                f"{_listing(base)} (the copy may have changed); pass the folder that holds "
                                "train2014/ and val2014/ with --data instead")
    for s in ("train2014", "val2014"):
        _link(images / s, root / s, linked)
    ann = base / "annotations"
    if all((ann / f"captions_{s}2014.json").is_file() for s in ("train", "val")):
        _link(ann, root / "annotations", linked)
    elif not (root / "annotations" / "captions_train2014.json").is_file():
        raise KaggleLayoutError(f"{src}: this Kaggle copy has the images but no captions_train2014.json / "
                                f"captions_val2014.json; the images are linked into {root}; fetch the caption "
                                f"annotations (253 MB) with: clipft download coco --out {root} --splits annotations")


def _layout_flickr(src: Path, root: Path, linked: list[str], dataset: str) -> None:
    from .flickr import find_layout
    lay = find_layout(src)
    if lay is None:
        raise KaggleLayoutError(f"{src}: the Kaggle copy of {dataset} has no Flickr caption file and image folder "
                                f"(found {_listing(src)}; the copy may have changed); pass a folder laid out as "
                                "docs/own-data.md (Flickr30k and Flickr8k) shows with --data")
    for entry in sorted(src.iterdir()):
        if not entry.name.startswith("."):
            _link(entry, root / entry.name, linked)


def download_kaggle(dataset: str, root: str | Path, fetch: Fetch | None = None) -> dict:
    """Fetch the Kaggle copy of `dataset` (coco, flickr8k, flickr30k) and lay it out in `root` as
    links. Returns {"dataset", "handle", "source", "root", "linked"}; errors are one-line
    DownloadErrors (KaggleError, NetworkError, RemoteFileError, KaggleLayoutError)."""
    if dataset not in KAGGLE_COPIES:
        raise KaggleError(f"no Kaggle copy known for {dataset!r} (known: {', '.join(KAGGLE_COPIES)})")
    copy = KAGGLE_COPIES[dataset]
    root = Path(root)
    log.info("fetching %s (%s) from Kaggle with kagglehub", copy.handle, copy.what)
    src = _fetch(fetch or kagglehub_fetch, copy)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DownloadError(f"{root}: cannot create the dataset folder ({e.strerror or e})") from None
    linked: list[str] = []
    if dataset == "coco":
        _layout_coco(src, root, linked)
    else:
        _layout_flickr(src, root, linked, dataset)
    return {"dataset": dataset, "handle": copy.handle, "source": str(src), "root": str(root), "linked": linked}


OFFICIAL_FLICKR = {
    "flickr8k": "https://forms.illinois.edu/sec/1713398",
    "flickr30k": "https://forms.illinois.edu/sec/229675",
}


def official_flickr_message(dataset: str, root: str | Path) -> str:
    """Why `download flickr* --source official` cannot work: the images need a request form."""
    return (f"the official {dataset} images are given out only after a request form ({OFFICIAL_FLICKR[dataset]}), "
            f"so clipft cannot download them; fill it in and unpack what you receive into {root}, or use "
            f"clipft download {dataset} --out {root} --source kaggle")
