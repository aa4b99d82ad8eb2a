"""`clipft download coco` against a local HTTP server on 127.0.0.1 (started per test, stopped at the
end) serving tiny zips in the real COCO layout: full download, resume after a cut connection, a
server that ignores Range, corrupt archives, checksums, 404, connection refused, disk space, and
the downloaded folder training with `clipft train`."""

import hashlib
import http.server
import json
import re
import socket
import threading
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest

from clipft.data import download as dl
from clipft.cli.commands import main
from clipft.data import load_coco_captions
from clipft.data.download import (COCO_ARCHIVES, CorruptArchiveError, DiskSpaceError, DownloadError,
                             NetworkError, RemoteFileError, download_coco, fetch, parse_content_range)
from train.test_loop import small_args

# The official table without the recorded sizes/checksums (our test zips are not the real ones).
TEST_ARCHIVES = {k: replace(a, size=None, checksum=None) for k, a in COCO_ARCHIVES.items()}


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    # requests honours *_proxy variables: make sure 127.0.0.1 is never sent through one.
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


# --------------------------------------------------------------------------- test data + server

def _zip_dir(src_root: Path, top: str, dest: Path) -> None:
    """zip src_root/top as top/... (directory entry first, like the official archives)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr(top + "/", b"")
        for f in sorted((src_root / top).iterdir()):
            zf.write(f, f"{top}/{f.name}")


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A tiny shapes dataset (the expected result) and a mirror dir holding its archives at the
    official relative paths."""
    from clipft.data.shapes import make_shapes_dataset
    base = tmp_path_factory.mktemp("dlsrc")
    data = make_shapes_dataset(base / "data", n_train=16, n_val=12, seed=0, image_size=32)
    mirror = base / "mirror"
    _zip_dir(data, "train2014", mirror / "zips" / "train2014.zip")
    _zip_dir(data, "val2014", mirror / "zips" / "val2014.zip")
    _zip_dir(data, "annotations", mirror / "annotations" / "annotations_trainval2014.zip")
    with zipfile.ZipFile(mirror / "caption_datasets.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("dataset_coco.json", json.dumps({"dataset": "coco", "images": [{"split": "test"}]}))
        zf.writestr("dataset_flickr8k.json", json.dumps({"dataset": "flickr8k", "images": []}))
    return data, mirror


class Server:
    """http.server on 127.0.0.1:<free port>. mode "range": honours `Range: bytes=N-` (206 / 416);
    "norange": always 200 with the whole file. `cut_after=N` closes the connection after N body
    bytes, for the next `cuts` GETs. Every request is logged as a dict."""

    def __init__(self, root: Path, mode: str = "range", cut_after: int | None = None, cuts: int = 1):
        self.root, self.mode, self.cut_after, self.cuts = Path(root), mode, cut_after, cuts
        self.log: list[dict] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_HEAD(self):
                self._serve(head=True)

            def do_GET(self):
                self._serve(head=False)

            def _serve(self, head):
                entry = {"method": self.command, "path": self.path, "range": self.headers.get("Range"),
                         "status": None, "sent": 0}
                server.log.append(entry)
                path = server.root / self.path.lstrip("/")
                if ".." in self.path or not path.is_file():
                    entry["status"] = 404
                    self.send_error(404)
                    return
                data = path.read_bytes()
                total, start = len(data), 0
                rng = self.headers.get("Range")
                if rng and server.mode == "range" and not head:
                    start = int(re.fullmatch(r"bytes=(\d+)-", rng).group(1))
                    if start >= total:
                        entry["status"] = 416
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{total}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{total - 1}/{total}")
                    entry["status"] = 206
                else:
                    self.send_response(200)
                    entry["status"] = 200
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Content-Type", "application/zip")
                self.end_headers()
                if head:
                    return
                if server.cut_after is not None and server.cuts > 0 and server.cut_after < len(body):
                    server.cuts -= 1
                    body = body[:server.cut_after]
                    self.close_connection = True  # then the socket closes: the client sees a short body
                self.wfile.write(body)
                self.wfile.flush()
                entry["sent"] = len(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def gets(self, path_part: str = "") -> list[dict]:
        return [e for e in self.log if e["method"] == "GET" and path_part in e["path"]]

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def serve():
    servers = []

    def start(root, **kw):
        s = Server(root, **kw)
        servers.append(s)
        return s
    yield start
    for s in servers:
        s.stop()


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now: connecting is refused
    return port


def _run(root, server, **kw):
    kw.setdefault("progress", False)
    kw.setdefault("retry_wait", 0.0)
    return download_coco(root, mirror=server.url, archives=kw.pop("archives", TEST_ARCHIVES), **kw)


def _same_tree(a: Path, b: Path) -> bool:
    fa = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    fb = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    return fa == fb and all((a / p).read_bytes() == (b / p).read_bytes() for p in fa)


def _no_temp_dirs(root: Path) -> bool:
    return not list(root.glob(".extract-*"))


# --------------------------------------------------------------------------- tests

def test_parse_content_range_and_mirror_url():
    assert parse_content_range("bytes 100-199/200") == (100, 199, 200)
    assert parse_content_range("bytes */200") == (None, None, 200)
    assert parse_content_range(None) == (None, None, None)
    assert parse_content_range("garbage") == (None, None, None)
    a = COCO_ARCHIVES["train"]
    assert dl.archive_url(a) == "http://images.cocodataset.org/zips/train2014.zip"
    assert dl.archive_url(a, "https://lab.example/coco/") == "https://lab.example/coco/zips/train2014.zip"
    assert COCO_ARCHIVES["annotations"].url.endswith("/annotations/annotations_trainval2014.zip")


def test_full_download_layout_and_rerun_fetches_nothing(source, serve, tmp_path):
    data, mirror = source
    server = serve(mirror)
    root = tmp_path / "coco"
    res = _run(root, server, karpathy=True)
    assert {r["archive"]: r["status"] for r in res} == {
        "annotations": "downloaded", "karpathy": "downloaded", "val": "downloaded", "train": "downloaded"}
    for top in ("train2014", "val2014", "annotations"):
        assert _same_tree(data / top, root / top), top
    assert json.loads((root / "dataset_coco.json").read_text())["dataset"] == "coco"
    assert not (root / "dataset_flickr8k.json").exists()  # only dataset_coco.json is taken
    assert len(load_coco_captions(root, "train")) == 16 and len(load_coco_captions(root, "val")) == 12
    # Archives deleted after extraction, one marker each, no temp dirs or partial files.
    downloads = root / "downloads"
    assert not list(downloads.glob("*.zip")) and not list(downloads.glob("*.part"))
    assert len(list(downloads.glob("*.done"))) == 4 and _no_temp_dirs(root)
    # Every archive fetched exactly once.
    assert len(server.gets()) == 4 and all(e["status"] == 200 for e in server.gets())

    n = len(server.log)
    res = _run(root, server, karpathy=True)
    assert {r["status"] for r in res} == {"present"}
    assert len(server.log) == n  # a finished archive is never fetched again (not even a HEAD)


def test_interrupted_download_resumes_with_range(source, serve, tmp_path):
    data, mirror = source
    size = (mirror / "zips" / "train2014.zip").stat().st_size
    cut = size // 2
    server = serve(mirror, cut_after=cut, cuts=1)
    root = tmp_path / "coco"
    with pytest.raises(NetworkError, match="rerun the same command to resume"):
        _run(root, server, splits=["train"], retries=0)
    part = root / "downloads" / "train2014.zip.part"
    assert part.stat().st_size == cut
    assert not (root / "train2014").exists()

    _run(root, server, splits=["train"], retries=0)
    first, second = server.gets("train2014")
    assert first["sent"] == cut and first["range"] is None
    assert second["range"] == f"bytes={cut}-" and second["status"] == 206
    assert second["sent"] == size - cut < size  # only the missing half crossed the wire
    assert _same_tree(data / "train2014", root / "train2014") and not part.exists()


def test_lost_connection_is_resumed_within_one_call(source, serve, tmp_path):
    data, mirror = source
    size = (mirror / "zips" / "val2014.zip").stat().st_size
    server = serve(mirror, cut_after=size // 3, cuts=2)  # two cuts, then a full answer
    root = tmp_path / "coco"
    _run(root, server, splits=["val"], retries=3, keep_archives=True)
    gets = server.gets("val2014")
    assert [g["status"] for g in gets] == [200, 206, 206]
    assert sum(g["sent"] for g in gets) == size
    assert (root / "downloads" / "val2014.zip").read_bytes() == (mirror / "zips" / "val2014.zip").read_bytes()
    assert _same_tree(data / "val2014", root / "val2014")


def test_server_ignoring_range_restarts_cleanly(source, serve, tmp_path):
    data, mirror = source
    server = serve(mirror, mode="norange")
    root = tmp_path / "coco"
    part = root / "downloads" / "val2014.zip.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(b"\xff" * 1000)  # garbage: appending the 200 body to it would corrupt the zip
    _run(root, server, splits=["val"], keep_archives=True)
    (g,) = server.gets("val2014")
    assert g["range"] == "bytes=1000-" and g["status"] == 200
    assert (root / "downloads" / "val2014.zip").read_bytes() == (mirror / "zips" / "val2014.zip").read_bytes()
    assert _same_tree(data / "val2014", root / "val2014")


def test_complete_part_file_is_not_fetched_again(source, serve, tmp_path):
    _, mirror = source
    server = serve(mirror)
    src = mirror / "annotations" / "annotations_trainval2014.zip"
    # A .part that already holds every byte (killed before the rename): the server answers 416.
    dest = tmp_path / "dl" / "a.zip"
    dest.parent.mkdir()
    (tmp_path / "dl" / "a.zip.part").write_bytes(src.read_bytes())
    fetch(f"{server.url}/annotations/annotations_trainval2014.zip", dest, retries=0)
    assert dest.read_bytes() == src.read_bytes()
    assert [g["status"] for g in server.gets()] == [416]
    # A finished file is returned as is, without any request.
    fetch(f"{server.url}/annotations/annotations_trainval2014.zip", dest, retries=0)
    assert len(server.log) == 1


def _corrupt_member(src: Path, dest: Path, member_index: int = 3) -> str:
    """Copy a STORED zip, flipping one byte in the middle of a member's data (its CRC no longer matches)."""
    raw = bytearray(src.read_bytes())
    with zipfile.ZipFile(src) as zf:
        info = zf.infolist()[member_index]
    # Local header: 30 fixed bytes + name + extra field (lengths at offsets 26 and 28).
    n = int.from_bytes(raw[info.header_offset + 26:info.header_offset + 28], "little")
    m = int.from_bytes(raw[info.header_offset + 28:info.header_offset + 30], "little")
    raw[info.header_offset + 30 + n + m + info.compress_size // 2] ^= 0xFF
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(bytes(raw))
    return info.filename


def test_corrupt_archive_refused_and_removed(source, serve, tmp_path):
    data, mirror = source
    bad_mirror = tmp_path / "bad"
    name = _corrupt_member(mirror / "zips" / "train2014.zip", bad_mirror / "zips" / "train2014.zip")
    server = serve(bad_mirror)
    root = tmp_path / "coco"
    with pytest.raises(CorruptArchiveError) as e:
        _run(root, server, splits=["train"])
    msg = str(e.value)
    assert "train2014.zip" in msg and name in msg and "CRC" in msg and "\n" not in msg
    # Nothing half-extracted, archive gone (so the next run fetches it again), no marker.
    assert not (root / "train2014").exists() and _no_temp_dirs(root)
    assert not list((root / "downloads").glob("train2014.zip*"))

    good = serve(mirror)  # the mirror is fixed: the rerun downloads and extracts it
    _run(root, good, splits=["train"])
    assert _same_tree(data / "train2014", root / "train2014")


def test_unexpected_layout_and_unsafe_names_are_refused(serve, tmp_path):
    m = tmp_path / "m"
    (m / "zips").mkdir(parents=True)
    with zipfile.ZipFile(m / "zips" / "val2014.zip", "w") as zf:
        zf.writestr("val2014/a.jpg", b"x")
        zf.writestr("other/b.jpg", b"y")
    with zipfile.ZipFile(m / "zips" / "train2014.zip", "w") as zf:
        zf.writestr("train2014/../../evil.txt", b"x")
    server = serve(m)
    root = tmp_path / "coco"
    with pytest.raises(CorruptArchiveError, match="unexpected layout.*other/b.jpg"):
        _run(root, server, splits=["val"])
    with pytest.raises(CorruptArchiveError, match="unsafe member name"):
        _run(root, server, splits=["train"])
    assert not (root / "val2014").exists() and not (tmp_path / "evil.txt").exists() and _no_temp_dirs(root)


def test_recorded_checksum_and_size_are_checked(source, serve, tmp_path):
    data, mirror = source
    server = serve(mirror)
    src = mirror / "zips" / "val2014.zip"
    sha = hashlib.sha256(src.read_bytes()).hexdigest()
    bad = {"val": replace(TEST_ARCHIVES["val"], checksum="md5:" + "0" * 32)}
    with pytest.raises(CorruptArchiveError, match="does not match the recorded"):
        _run(tmp_path / "a", server, splits=["val"], archives=bad)
    assert not (tmp_path / "a" / "val2014").exists() and not list((tmp_path / "a" / "downloads").glob("val2014*"))

    wrong_size = {"val": replace(TEST_ARCHIVES["val"], size=src.stat().st_size + 1)}
    n = len(server.gets())
    with pytest.raises(RemoteFileError, match="known to be"):
        _run(tmp_path / "b", server, splits=["val"], archives=wrong_size)
    assert len(server.gets()) == n  # refused at planning, from the HEAD answer

    good = {"val": replace(TEST_ARCHIVES["val"], size=src.stat().st_size, checksum=f"sha256:{sha}")}
    _run(tmp_path / "c", server, splits=["val"], archives=good)
    assert _same_tree(data / "val2014", tmp_path / "c" / "val2014")


def test_not_enough_disk_space_is_reported_before_downloading(source, serve, tmp_path):
    _, mirror = source
    server = serve(mirror)
    with pytest.raises(DiskSpaceError, match="not enough free space"):
        _run(tmp_path / "coco", server, disk_free=lambda root: 1000)
    assert server.gets() == []  # only HEAD requests were made


def test_disk_full_while_writing_is_one_line(source, serve, tmp_path, capsys):
    import errno
    _, mirror = source
    server = serve(mirror)

    def full_disk(r):
        yield b"x" * 10
        raise OSError(errno.ENOSPC, "No space left on device")
    root = tmp_path / "coco"
    with dl.use_hooks(archives=TEST_ARCHIVES, chunks=full_disk):
        assert main(["download", "coco", "--out", str(root), "--splits", "val", "--mirror", server.url,
                     "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("clipft: error: ") and "disk full" in err and "\n" not in err
    assert (root / "downloads" / "val2014.zip.part").stat().st_size == 10  # kept for the rerun


def test_cli_404_is_one_line(serve, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    server = serve(empty)
    with dl.use_hooks(archives=TEST_ARCHIVES):
        assert main(["download", "coco", "--out", str(tmp_path / "coco"), "--mirror", server.url, "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("clipft: error: ") and "404" in err and "\n" not in err
    assert "annotations_trainval2014.zip" in err


def test_cli_connection_refused_is_one_line(tmp_path, capsys):
    url = f"http://127.0.0.1:{_closed_port()}"
    with dl.use_hooks(archives=TEST_ARCHIVES):
        assert main(["download", "coco", "--out", str(tmp_path / "coco"), "--mirror", url, "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("clipft: error: ") and "cannot connect" in err and "refused" in err.lower()
    assert "\n" not in err


def test_fetch_gives_up_after_retries_when_the_server_is_gone(tmp_path):
    url = f"http://127.0.0.1:{_closed_port()}/x.zip"
    with pytest.raises(NetworkError, match="cannot connect"):
        fetch(url, tmp_path / "x.zip", retries=2, retry_wait=0.0)
    assert not (tmp_path / "x.zip").exists()


def test_download_rejects_unknown_split_and_empty_request(tmp_path):
    with pytest.raises(DownloadError, match="unknown split"):
        download_coco(tmp_path, splits=["test"])
    with pytest.raises(DownloadError, match="nothing to download"):
        download_coco(tmp_path, splits=[])


def test_existing_folder_not_written_by_us_is_left_alone(source, serve, tmp_path):
    _, mirror = source
    server = serve(mirror)
    root = tmp_path / "coco"
    (root / "val2014").mkdir(parents=True)
    (root / "val2014" / "mine.jpg").write_bytes(b"keep me")
    (res,) = _run(root, server, splits=["val"])
    assert res["status"] == "existing" and server.log == []
    assert [p.name for p in (root / "val2014").iterdir()] == ["mine.jpg"]


def test_downloaded_folder_trains(source, serve, tmp_path, tiny_clip_dir, capsys):
    """The acceptance path: `clipft download coco` from a mirror, then `clipft train` on the result."""
    _, mirror = source
    server = serve(mirror)
    root = tmp_path / "coco"
    with dl.use_hooks(archives=TEST_ARCHIVES):
        assert main(["download", "coco", "--out", str(root), "--mirror", server.url, "--quiet"]) == 0
    out = capsys.readouterr().out
    assert f"clipft cache-text --data {root}" in out and f"clipft train --data {root}" in out
    run = tmp_path / "run"
    assert main(["train", "--data", str(root), "--out", str(run), *small_args(tiny_clip_dir, epochs=1)]) == 0
    assert (run / "best.pt").is_file()
    assert json.loads((run / "summary.json").read_text())["dataset"]["val_images"] == 12


def test_karpathy_flickr_split_file(source, serve, tmp_path, capsys):
    """`download flickr8k --karpathy`: only dataset_flickr8k.json is taken from caption_datasets.zip;
    the official Flickr images need a request form, which the output points to."""
    from clipft.data.download import karpathy_archive
    _, mirror = source
    server = serve(mirror)
    root = tmp_path / "f8k"
    _run(root, server, splits=(), karpathy=True, archives={"karpathy": karpathy_archive("dataset_flickr8k.json")})
    assert json.loads((root / "dataset_flickr8k.json").read_text())["dataset"] == "flickr8k"
    assert not (root / "dataset_coco.json").exists()
    root2 = tmp_path / "f8k-cli"
    assert main(["download", "flickr8k", "--out", str(root2), "--karpathy", "--mirror", server.url, "--quiet"]) == 0
    out = capsys.readouterr().out
    assert (root2 / "dataset_flickr8k.json").is_file() and "https://forms.illinois.edu/sec/1713398" in out


def test_mirror_without_scheme_says_the_url_needs_http(tmp_path):
    with pytest.raises(DownloadError, match=r"needs its scheme, e.g. http://127.0.0.1:9"):
        dl.download_coco(tmp_path / "coco", splits=["annotations"], mirror="127.0.0.1:9", progress=False)
    assert not (tmp_path / "coco").exists() or not any((tmp_path / "coco").iterdir())
