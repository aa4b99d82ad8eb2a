"""Fetch MS COCO 2014 (and Karpathy's split file) into exactly the layout `clipft.data` reads.

    ROOT/train2014/COCO_train2014_*.jpg          <- zips/train2014.zip                 (~13.5 GB)
    ROOT/val2014/COCO_val2014_*.jpg              <- zips/val2014.zip                   (~6.6 GB)
    ROOT/annotations/captions_{train,val}2014.json (+ instances_*, person_keypoints_*)
                                                 <- annotations/annotations_trainval2014.zip (~253 MB)
    ROOT/dataset_coco.json                       <- caption_datasets.zip (only this member; `karpathy=True`)
    ROOT/downloads/                              archives in flight (NAME.part), kept archives, and
                                                 NAME.done markers (one per finished archive)

Life of one archive:
1. Planning, before any byte is fetched: a HEAD request per missing archive gives its size (and
   turns "no network" or a 404 into an error right away); the peak disk use of the whole run is
   compared with the free space of ROOT.
2. Download into `downloads/NAME.part`. An existing .part is continued with `Range: bytes=N-`; a
   server that answers 200 instead of 206 (Range ignored) restarts the file from byte 0. A
   connection lost mid-way is retried from where it stopped (`retries` times), then reported;
   rerunning continues it. The received size must equal the server's Content-Length (and the
   recorded size, if any); a recorded checksum is checked. Only then `.part` becomes `NAME`:
   a finished archive is never fetched again.
3. Extraction into a temp dir `ROOT/.extract-NAME-*`, reading every member through zipfile (which
   checks each member's CRC-32 when its last byte is read), then `os.replace` of the top-level
   folder into place: ROOT never holds a half-extracted folder. A corrupt archive is deleted and
   reported; the next run fetches it again.
4. `downloads/NAME.done` is written and the archive deleted (unless `keep_archives`).

`requests` is imported inside the functions, so importing this module (the CLI does, for
`DownloadError`) never needs it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
import zipfile
import zlib
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import Callable, Iterator

from tqdm.auto import tqdm


log = logging.getLogger(__name__)

DOWNLOADS_DIR = "downloads"
KARPATHY_FILE = "dataset_coco.json"
# (connect, read) seconds: a read timeout counts as a lost connection and is retried with Range.
TIMEOUT = (15.0, 60.0)
CHUNK = 1 << 20


class DownloadError(Exception):
    """A download or extraction failed in an expected way; the message is one line for the CLI."""


class NetworkError(DownloadError):
    """The server could not be reached (no network, DNS failure, connection refused, timeout)."""


class RemoteFileError(DownloadError):
    """The server answered, but not with the file we want (404, other HTTP errors, wrong size)."""


class DiskSpaceError(DownloadError):
    """Not enough free space for the run (checked before starting), or the disk filled up anyway."""


class CorruptArchiveError(DownloadError):
    """An archive failed its checksum, its size check, or a member's CRC; it has been deleted."""


@dataclass(frozen=True)
class Archive:
    """One downloadable archive and where its contents go under ROOT."""
    key: str                 # "train" | "val" | "annotations" | "karpathy"
    url: str                 # official location
    mirror_path: str         # path of the same file under a --mirror base URL
    targets: tuple[str, ...]  # top-level entries it creates under ROOT
    only: tuple[str, ...] = ()  # extract just these member basenames, flat into ROOT (karpathy)
    size: int | None = None  # recorded size in bytes; None = unknown (then only Content-Length is checked)
    checksum: str | None = None  # "md5:<hex>" or "sha256:<hex>"; None = not recorded
    expand: float = 1.02     # extracted bytes / archive bytes: the disk-space estimate before the
                             # archive is here (JPEGs do not compress; JSON does, ~3x)

    @property
    def filename(self) -> str:
        return PurePosixPath(self.mirror_path).name


# Sizes are the Content-Length images.cocodataset.org serves (also in many published wget logs);
# the MD5s are the ones published alongside the official URLs (e.g. Salesforce LAVIS' COCO builders)
# and equal the S3 ETags of these single-part uploads. The Karpathy zip has no published size or
# checksum: only Content-Length and the zip's own CRCs protect it.
COCO_ARCHIVES: dict[str, Archive] = {
    "annotations": Archive(
        "annotations", "http://images.cocodataset.org/annotations/annotations_trainval2014.zip",
        "annotations/annotations_trainval2014.zip", ("annotations",),
        size=252_872_794, checksum="md5:0a379cfc70b0e71301e0f377548639bd", expand=4.0),
    "karpathy": Archive(
        "karpathy", "https://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip",
        "caption_datasets.zip", (KARPATHY_FILE,), only=(KARPATHY_FILE,), expand=4.0),
    "val": Archive(
        "val", "http://images.cocodataset.org/zips/val2014.zip", "zips/val2014.zip", ("val2014",),
        size=6_645_013_297, checksum="md5:a3d79f5ed8d289b7a7554ce06a5782b3"),
    "train": Archive(
        "train", "http://images.cocodataset.org/zips/train2014.zip", "zips/train2014.zip", ("train2014",),
        size=13_510_573_713, checksum="md5:0da8c0bd3d6becc4dcb32757491aca88"),
}
SPLITS = ("train", "val", "annotations")


# --------------------------------------------------------------------------- small helpers

def _gb(n: float) -> str:
    """Human-readable byte count (decimal units, like the sizes on the COCO page)."""
    if n >= 1e8:
        return f"{n / 1e9:.2f} GB"
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def archive_url(archive: Archive, mirror: str | None = None) -> str:
    """The official URL, or MIRROR/<mirror_path> (e.g. https://lab/coco/zips/train2014.zip)."""
    return archive.url if not mirror else f"{mirror.rstrip('/')}/{archive.mirror_path}"


def parse_content_range(value: str | None) -> tuple[int | None, int | None, int | None]:
    """`bytes START-END/TOTAL` -> (start, end, total); `bytes */TOTAL` -> (None, None, total);
    None entries for what is missing or unparseable."""
    m = re.fullmatch(r"\s*bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)\s*", value or "")
    if not m:
        return None, None, None
    start, end, total = m.groups()
    conv = lambda s: int(s) if s and s != "*" else None  # noqa: E731
    return conv(start), conv(end), conv(total)


def _reason(exc: BaseException) -> str:
    """The short cause inside requests' long ConnectionError text ('[Errno 111] Connection refused')."""
    text = str(exc)
    for pat in (r"\[Errno -?\d+\] [^'\")]+", r"IncompleteRead\([^)]*\)", r"Connection reset by peer",
                r"Connection refused", r"Read timed out", r"timed out", r"Name or service not known",
                r"Temporary failure in name resolution", r"Connection broken: [^'\"]+"):
        m = re.search(pat, text)
        if m:
            return m.group(0).strip()
    return (text.splitlines() or [type(exc).__name__])[0][:200]


def _enospc(exc: OSError, where: Path) -> DiskSpaceError:
    return DiskSpaceError(f"{where}: disk full ({exc.strerror}); free some space and rerun the same "
                          "command (finished parts are kept)")


def file_checksum(path: Path, algo: str, progress: bool = False) -> str:
    """Hex digest of a file (md5 / sha256 / any hashlib name), read in 8 MB blocks."""
    h = hashlib.new(algo)
    with open(path, "rb") as f, tqdm(total=path.stat().st_size, unit="B", unit_scale=True, unit_divisor=1024,
                                     desc=f"{algo} {path.name}", disable=None if progress else True,
                                     leave=False) as bar:
        while block := f.read(8 << 20):
            h.update(block)
            bar.update(len(block))
    return h.hexdigest()


def _session():
    import requests
    s = requests.Session()
    # identity: the bytes on the wire are the file's bytes, so Content-Length and Range offsets
    # are offsets in the archive (a server gzip-ing a zip would break resuming).
    s.headers.update({"Accept-Encoding": "identity", "User-Agent": "clipft-download"})
    return s


@contextlib.contextmanager
def _lock(root: Path) -> Iterator[None]:
    """One download per ROOT at a time (two would write the same .part). flock is released by the
    kernel when the process dies, so a killed run leaves no stale lock. No-op where fcntl is absent.
    The lock file goes when the download ends, finished or failed (removed while still held: a second
    download that opened it before fails its non-blocking flock; one that opens it after makes a new
    file), and OUT/downloads with it when nothing else is in it (no partial archive to resume)."""
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    path = root / DOWNLOADS_DIR / ".lock"
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise DownloadError(f"{root}: another `clipft download` is writing here (lock {path})") from None
        try:
            yield
        finally:
            path.unlink(missing_ok=True)
            fcntl.flock(f, fcntl.LOCK_UN)
    with contextlib.suppress(OSError):
        path.parent.rmdir()  # only when empty


# --------------------------------------------------------------------------- download

class _Interrupted(Exception):
    """The transfer stopped early; what arrived is on disk and a Range request continues it."""


def remote_size(url: str, session=None, timeout=TIMEOUT) -> int | None:
    """Content-Length from a HEAD request (None if the server does not say). Raises NetworkError
    when the host cannot be reached and RemoteFileError on 404 / other HTTP errors."""
    import requests
    sess = session or _session()
    try:
        r = sess.head(url, allow_redirects=True, timeout=timeout)
    except requests.RequestException as e:
        raise NetworkError(f"{url}: cannot connect ({_reason(e)}); check the network, or use --mirror") from None
    if r.status_code == 404:
        raise RemoteFileError(f"{url}: HTTP 404 Not Found (wrong --mirror, or the file moved)")
    if r.status_code in (405, 501):  # HEAD not supported: the GET will tell
        return None
    if r.status_code >= 400:
        raise RemoteFileError(f"{url}: HTTP {r.status_code} {r.reason}")
    n = r.headers.get("Content-Length")
    return int(n) if n and n.isdigit() else None


def _chunks(r) -> Iterator[bytes]:
    """The body as it arrives. urllib3's read1 hands over whatever has arrived (<= CHUNK bytes), so
    when the connection drops, everything received so far has been written and a Range request
    continues from there; iter_content(CHUNK) buffers up to CHUNK bytes and loses them with the
    error. decode_content=False: bytes on disk are the bytes Content-Length and Range count."""
    read1 = getattr(r.raw, "read1", None)
    if read1 is None:  # urllib3 < 2.1
        yield from r.iter_content(CHUNK)
        return
    while chunk := read1(CHUNK, decode_content=False):
        yield chunk


@dataclass
class DownloadHooks:
    """Replaceable parts of `clipft download` (seams for tests: a small archive table, a full disk),
    installed with `use_hooks`, also for the calls `cli.main` makes."""
    archives: dict[str, Archive] | None = None  # None = COCO_ARCHIVES
    chunks: Callable[..., Iterator[bytes]] = _chunks  # the response body as it arrives


_HOOKS = DownloadHooks()


def use_hooks(**parts) -> contextlib.AbstractContextManager[DownloadHooks]:
    """Downloads inside the block run with these parts of `DownloadHooks` replaced."""
    from ..runtime import overriding  # imported here: runtime imports torch, which a download never needs
    return overriding(_HOOKS, **parts)


def _fetch_once(sess, url: str, part: Path, expected_size: int | None, progress: bool,
                timeout) -> int:
    """One GET, continuing `part` from its current size. Returns the final size; raises
    _Interrupted if the transfer stopped early (retryable)."""
    import requests
    import urllib3
    have = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    try:
        r = sess.get(url, headers=headers, stream=True, timeout=timeout)
    except requests.RequestException as e:
        raise _Interrupted(f"cannot connect ({_reason(e)})") from None
    with r:
        if r.status_code == 416:
            # Range starts at or past the end: the .part is complete already (or longer than the file).
            _, _, total = parse_content_range(r.headers.get("Content-Range"))
            if total is not None and have == total:
                return have
            log.info("%s: server refused the range (416); restarting from byte 0", part.name)
            part.unlink()
            raise _Interrupted("range not satisfiable")
        if r.status_code == 404:
            raise RemoteFileError(f"{url}: HTTP 404 Not Found (wrong --mirror, or the file moved)")
        if r.status_code >= 500:
            raise _Interrupted(f"HTTP {r.status_code} {r.reason}")
        if r.status_code >= 400 or r.status_code not in (200, 206):
            raise RemoteFileError(f"{url}: HTTP {r.status_code} {r.reason}")
        if r.status_code == 206:
            start, _, total = parse_content_range(r.headers.get("Content-Range"))
            if start != have:
                log.info("%s: server sent bytes from %s instead of %d; restarting from byte 0", part.name, start, have)
                part.unlink()
                raise _Interrupted("unexpected Content-Range")
            mode = "ab"
        else:  # 200: the whole file, whatever we asked for
            if have:
                log.info("%s: server ignores Range requests; restarting from byte 0 (%s were on disk)",
                         part.name, _gb(have))
            have, mode = 0, "wb"
            n = r.headers.get("Content-Length")
            total = int(n) if n and n.isdigit() else None
        if expected_size is not None and total is not None and total != expected_size:
            raise RemoteFileError(f"{url}: server reports {total} bytes, but this archive is known to be "
                                  f"{expected_size} bytes (a different file, or an incomplete mirror)")
        total = total if total is not None else expected_size
        try:
            with open(part, mode) as f, tqdm(total=total, initial=have, unit="B", unit_scale=True,
                                             unit_divisor=1024, desc=part.name.removesuffix(".part"),
                                             disable=None if progress else True) as bar:
                try:
                    for chunk in _HOOKS.chunks(r):
                        f.write(chunk)
                        bar.update(len(chunk))
                except (requests.RequestException, urllib3.exceptions.HTTPError) as e:
                    # Caught before OSError below: RequestException is an IOError.
                    raise _Interrupted(_reason(e)) from None
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise _enospc(e, part) from None
            raise
    size = part.stat().st_size
    if total is None:
        log.warning("%s: the server sent no Content-Length; the size cannot be checked", url)
        return size
    if size < total:
        raise _Interrupted(f"connection closed at {size} of {total} bytes")
    if size > total:
        part.unlink()
        raise CorruptArchiveError(f"{url}: received {size} bytes, more than the {total} announced; "
                                  f"deleted {part}, rerun to download again")
    return size


def fetch(url: str, dest: str | Path, *, expected_size: int | None = None, checksum: str | None = None,
          retries: int = 3, retry_wait: float = 2.0, progress: bool = False, session=None,
          timeout=TIMEOUT) -> Path:
    """Download `url` to `dest` resumably (via DEST.part) and verify it; returns `dest`.

    A `dest` that exists is taken as finished and not fetched again. A lost connection is resumed
    with a Range request up to `retries` times (waiting retry_wait * 2**k s); after that a
    NetworkError says how far it got, and calling again continues from there. `checksum`
    ("md5:<hex>" / "sha256:<hex>") is verified on the complete file; on mismatch the file is
    deleted and CorruptArchiveError raised.
    """
    dest = Path(dest)
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    sess = session or _session()
    for attempt in range(retries + 1):
        try:
            size = _fetch_once(sess, url, part, expected_size, progress, timeout)
            break
        except _Interrupted as e:
            have = part.stat().st_size if part.exists() else 0
            if attempt == retries:
                if have == 0:
                    raise NetworkError(f"{url}: {e}; check the network, or use --mirror") from None
                raise NetworkError(f"{url}: download interrupted ({e}); {_gb(have)} kept in {part}, "
                                   "rerun the same command to resume") from None
            wait = retry_wait * 2 ** attempt
            log.warning("%s: %s; resuming from byte %d in %.0f s (retry %d of %d)",
                        dest.name, e, have, wait, attempt + 1, retries)
            time.sleep(wait)
    if checksum:
        algo, _, want = checksum.partition(":")
        got = file_checksum(part, algo, progress)
        if got.lower() != want.lower():
            part.unlink()
            raise CorruptArchiveError(f"{url}: {algo} {got} does not match the recorded {want}; "
                                      f"deleted the download, rerun to fetch it again")
        log.info("%s: %s checksum OK", dest.name, algo)
    os.replace(part, dest)
    log.info("%s: downloaded %s", dest.name, _gb(size))
    return dest


# --------------------------------------------------------------------------- extraction

def _safe_name(name: str, zip_path: Path) -> PurePosixPath:
    p = PurePosixPath(name)
    if p.is_absolute() or ".." in p.parts or (p.parts and ":" in p.parts[0]):
        raise CorruptArchiveError(f"{zip_path}: unsafe member name {name!r}")
    return p


def _select_members(zf: zipfile.ZipFile, targets: tuple[str, ...], only: tuple[str, ...],
                    zip_path: Path) -> list[tuple[zipfile.ZipInfo, PurePosixPath]]:
    """(member, path relative to ROOT) for what to extract; checks the archive has the expected layout."""
    out = []
    for info in zf.infolist():
        p = _safe_name(info.filename, zip_path)
        if not p.parts or p.parts[0] == "__MACOSX":
            continue
        if only:
            if not info.is_dir() and p.name in only:
                out.append((info, PurePosixPath(p.name)))
            continue
        if p.parts[0] not in targets:
            raise CorruptArchiveError(f"{zip_path}: unexpected layout, member {info.filename!r} is outside "
                                f"{', '.join(t + '/' for t in targets)} (is this the right archive?)")
        out.append((info, p))
    found = {rel.parts[0] for _, rel in out}
    missing = [t for t in targets if t not in found]
    if missing:
        raise CorruptArchiveError(f"{zip_path}: no {', '.join(missing)} in the archive (is this the right archive?)")
    return out


def extract_archive(zip_path: str | Path, root: str | Path, targets: tuple[str, ...],
                    only: tuple[str, ...] = (), progress: bool = False) -> list[Path]:
    """Extract the `targets` of a zip into ROOT atomically, checking every member's CRC-32.

    Members go to a temp dir inside ROOT (same filesystem, so the final `os.replace` is a rename);
    only when every member has been read back without error is each target moved into place. On a
    corrupt archive the temp dir is removed and CorruptArchiveError raised: ROOT is untouched.
    `only`: extract just members with these basenames, flat (the Karpathy zip's dataset_coco.json).
    """
    zip_path, root = Path(zip_path), Path(root)
    for stale in root.glob(f".extract-{zip_path.stem}-*"):  # left by a run killed mid-extraction
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".extract-{zip_path.stem}-", dir=root))
    try:
        try:
            zf = zipfile.ZipFile(zip_path)
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise CorruptArchiveError(f"{zip_path}: not a readable zip archive ({e})") from None
        with zf:
            members = _select_members(zf, targets, only, zip_path)
            need = sum(i.file_size for i, _ in members)
            free = shutil.disk_usage(root).free
            if need > free:
                raise DiskSpaceError(f"{root}: extracting {zip_path.name} needs {_gb(need)}, only {_gb(free)} free")
            info = None
            try:
                for info, rel in tqdm(members, unit="file", desc=f"extract {zip_path.name}",
                                      disable=None if progress else True):
                    out = tmp.joinpath(*rel.parts)
                    if info.is_dir():
                        out.mkdir(parents=True, exist_ok=True)
                        continue
                    out.parent.mkdir(parents=True, exist_ok=True)
                    # zipfile raises BadZipFile("Bad CRC-32 ...") when the last byte of a member is read.
                    with zf.open(info) as src, open(out, "wb") as dst:
                        shutil.copyfileobj(src, dst, CHUNK)
            except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as e:
                name = info.filename if info is not None else "?"
                raise CorruptArchiveError(f"{zip_path}: corrupt member {name!r} ({e})") from None
            except OSError as e:
                if e.errno == errno.ENOSPC:
                    raise _enospc(e, root) from None
                raise
        placed = []
        for t in targets:
            dst = root / t
            if dst.exists():
                raise DownloadError(f"{dst} appeared while extracting {zip_path.name}; move it away and rerun")
            os.replace(tmp / t, dst)
            placed.append(dst)
        return placed
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------- COCO

def _marker(root: Path, a: Archive) -> Path:
    return root / DOWNLOADS_DIR / f"{a.filename}.done"


def _zip_payload(zip_path: Path) -> int | None:
    try:
        with zipfile.ZipFile(zip_path) as zf:
            return sum(i.file_size for i in zf.infolist())
    except (zipfile.BadZipFile, OSError, EOFError):
        return None


def karpathy_archive(split_file: str = KARPATHY_FILE) -> Archive:
    """Karpathy's caption_datasets.zip, taking only `split_file` (dataset_coco.json,
    dataset_flickr8k.json or dataset_flickr30k.json) into ROOT."""
    return replace(COCO_ARCHIVES["karpathy"], targets=(split_file,), only=(split_file,))


def download_coco(root: str | Path, splits=SPLITS, karpathy: bool = False, mirror: str | None = None, *,
                  keep_archives: bool = False, retries: int = 3, retry_wait: float = 2.0,
                  progress: bool = True, archives: dict[str, Archive] | None = None,
                  timeout=TIMEOUT, disk_free: Callable[[Path], int] | None = None) -> list[dict]:
    """Fetch and extract the COCO 2014 archives for `splits` (train / val / annotations) and, with
    `karpathy`, Karpathy's dataset_coco.json, into ROOT. Safe to rerun: what is done is skipped,
    what was interrupted is resumed. `mirror`: base URL serving the same relative paths
    (Archive.mirror_path). `archives` replaces the table (tests: small zips, no recorded sizes);
    `disk_free(root)` the free-space probe of the up-front space check (default: shutil.disk_usage).
    Returns one record per archive: {"archive", "status", "targets"}, status in
    "downloaded" | "present" | "existing" (already in ROOT, not written by clipft download).
    """
    table = archives if archives is not None else _HOOKS.archives or COCO_ARCHIVES
    keys = [k for k in ("annotations", "karpathy", "val", "train")  # small first: failures show early
            if k in set(splits) | ({"karpathy"} if karpathy else set())]
    bad = sorted(set(splits) - set(SPLITS))
    if bad:
        raise DownloadError(f"unknown split(s) {', '.join(bad)} (choose from {', '.join(SPLITS)})")
    if not keys:
        raise DownloadError("nothing to download: give --splits and/or --karpathy")
    if mirror and not mirror.startswith(("http://", "https://")):
        raise DownloadError(f"--mirror {mirror}: the URL needs its scheme, e.g. http://{mirror} or https://{mirror}")
    root = Path(root)
    try:
        (root / DOWNLOADS_DIR).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DownloadError(f"{root}: cannot create the dataset folder ({e.strerror})") from None

    with _lock(root):
        results, todo = [], []
        for k in keys:
            a = table[k]
            marker, present = _marker(root, a), [t for t in a.targets if (root / t).exists()]
            archive = root / DOWNLOADS_DIR / a.filename
            if marker.is_file() and len(present) == len(a.targets):
                log.info("%s: already in %s", a.filename, root)
                results.append({"archive": k, "status": "present", "targets": [str(root / t) for t in a.targets]})
            elif present and not marker.is_file():
                if archive.is_file():  # a previous run was stopped between the rename and the marker
                    _finish(root, a, archive, keep_archives)
                    results.append({"archive": k, "status": "present", "targets": [str(root / t) for t in a.targets]})
                else:
                    log.warning("%s exists already (not written by clipft download): left as is; delete it "
                                "to download %s again", ", ".join(str(root / t) for t in present), a.filename)
                    results.append({"archive": k, "status": "existing", "targets": [str(root / t) for t in present]})
            else:
                if marker.is_file():  # targets deleted since: start over for this archive
                    marker.unlink()
                todo.append(a)
        if not todo:
            return results

        # Plan: sizes (HEAD also reports no network / 404 before anything is written), then disk space.
        sess = _session()
        peak = used = 0.0
        for a in todo:
            archive = root / DOWNLOADS_DIR / a.filename
            if archive.is_file():
                payload = _zip_payload(archive)
                fetch_bytes, extract_bytes = 0, payload if payload is not None else archive.stat().st_size * a.expand
                total = archive.stat().st_size
            else:
                url = archive_url(a, mirror)
                total = remote_size(url, sess, timeout)
                if total is not None and a.size is not None and total != a.size:
                    raise RemoteFileError(f"{url}: server reports {total} bytes, but this archive is known to be "
                                          f"{a.size} bytes (a different file, or an incomplete mirror)")
                total = total if total is not None else a.size
                part = archive.with_name(archive.name + ".part")
                have = part.stat().st_size if part.exists() else 0
                fetch_bytes = max(0, (total or 0) - have)
                extract_bytes = (total or 0) * a.expand
            used += fetch_bytes
            peak = max(peak, used + extract_bytes)
            used += extract_bytes - (0 if keep_archives else (total or 0))
        free = disk_free(root) if disk_free else shutil.disk_usage(root).free
        if peak > free:
            raise DiskSpaceError(f"{root}: not enough free space: this run needs about {_gb(peak)} at its peak "
                                 f"(archives + extracted files), {_gb(free)} free")
        log.info("%s: %d archive(s) to fetch/extract, peak disk use about %s (%s free)",
                 root, len(todo), _gb(peak), _gb(free))

        for a in todo:
            archive = root / DOWNLOADS_DIR / a.filename
            url = archive_url(a, mirror)
            fetch(url, archive, expected_size=a.size, checksum=a.checksum, retries=retries,
                  retry_wait=retry_wait, progress=progress, session=sess, timeout=timeout)
            try:
                extract_archive(archive, root, a.targets, a.only, progress=progress)
            except CorruptArchiveError as e:
                archive.unlink(missing_ok=True)
                raise CorruptArchiveError(f"{e}; deleted it, rerun to download it again") from None
            _finish(root, a, archive, keep_archives, url=url)
            results.append({"archive": a.key, "status": "downloaded", "targets": [str(root / t) for t in a.targets]})
        return results


def _finish(root: Path, a: Archive, archive: Path, keep_archives: bool, url: str | None = None) -> None:
    """Record that `a` is extracted (so it is never fetched again), then drop the archive."""
    info = {"archive": a.filename, "url": url, "bytes": archive.stat().st_size, "checksum": a.checksum,
            "targets": list(a.targets), "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    _marker(root, a).write_text(json.dumps(info, indent=1) + "\n")
    if not keep_archives:
        archive.unlink()
    log.info("%s: extracted into %s%s", a.filename, ", ".join(str(root / t) for t in a.targets),
             "" if keep_archives else " (archive deleted)")


def next_steps(root: str | Path) -> list[str]:
    """What to run after a download, given what ROOT now holds (lines for the CLI to print)."""
    root = Path(root)
    have = {
        "train": (root / "train2014").is_dir(),
        "val": (root / "val2014").is_dir(),
        "annotations": (root / "annotations" / "captions_train2014.json").is_file()
                       and (root / "annotations" / "captions_val2014.json").is_file(),
    }
    lines = []
    missing = [k for k, ok in have.items() if not ok]
    if missing:
        lines.append(f"still missing for training: {', '.join(missing)} "
                     f"(clipft download coco --out {root} --splits {' '.join(missing)})")
    else:
        lines += ["next:",
                  f"  clipft cache-text --data {root} --split train val --config coco-rn50",
                  f"  clipft train --data {root} --out runs/coco-rn50 --config coco-rn50"]
    if (root / KARPATHY_FILE).is_file():
        lines.append(f"Karpathy split file (karpathy-test evaluation protocol): {root / KARPATHY_FILE}")
    return lines
