"""`clipft serve`: a local, read-only HTTP API and page over one or more indexes (Flask).

    GET /api/search?q=TEXT&k=N[&index=I]              {"results": [{"id", "path", "score"}], "model", "took_ms"}
    GET /api/similar/<id>?k=N[&index=I][&target=J]    same shape; the image <id> of index I, searched in index J
    GET /api/duplicates?threshold=T[&index=I]         {"groups": [[{"id", "path"}, ...], ...]}
    GET /api/indexes                                  {"indexes": [{"index", "model", "images", "root"}]}
    GET /thumb/<id>, /image/<id>[?index=I]            the bytes of an indexed image (thumbnail cached)
    GET /?q=TEXT                                      the page, with that search already run

This serves files from a person's disk, so: images are found only by index id, never by a path from
the request; the file must resolve (symlinks followed) inside the indexed folder; only GET/HEAD exist;
k, the query length and the request rate are bounded; a loopback server answers only requests whose
Host is a loopback name (a page elsewhere cannot reach it through DNS rebinding). Every error is JSON
with a 4xx status.
"""

from __future__ import annotations

import io
import ipaddress
import math
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from flask import Flask, Response, jsonify, request, send_file
from PIL import Image
from werkzeug.exceptions import HTTPException

from .query import (LoadedIndex, duplicate_groups, duplicates_answer, results_answer, search_similar, search_text,
                    top_k)

MAX_K = 200
MAX_QUERY_CHARS = 300
MIN_THRESHOLD = 0.5  # lower thresholds group almost everything and cost O(N^2) pairs
THUMB_PX = 256
# Pixels a thumbnail may decode: a JPEG is first reduced by its DCT draft (up to 1/8 a side); any other
# format, or a JPEG still above this, is refused (413) before decoding. 40 Mpx RGB is 120 MB at most.
THUMB_MAX_PIXELS = 40_000_000
THUMB_WORKERS = 2  # thumbnails decoded at once, whatever the number of requests: bounds peak memory
THUMB_WAIT_S = 30.0  # a request waiting longer than this for a decoding slot gets 503
_thumb_slots = threading.BoundedSemaphore(THUMB_WORKERS)
STATIC = Path(__file__).parent / "static"
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1", "[::1]"}
MIME = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".webp": "image/webp",
        ".bmp": "image/bmp", ".gif": "image/gif", ".tif": "image/tiff", ".tiff": "image/tiff"}


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class Served:
    """One index and the model that embeds its text queries (`clipft.inference.ImageTextModel`)."""
    idx: LoadedIndex
    model: object
    duplicates: dict[float, list[list[int]]] = field(default_factory=dict)


class RateLimiter:
    """Token bucket per client address: `burst` requests at once, refilled at `rate` per second."""

    def __init__(self, rate: float, burst: int, clock=time.monotonic):
        self.rate, self.burst, self.clock = rate, burst, clock
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def allow(self, client: str) -> bool:
        with self._lock:
            now = self.clock()
            tokens, last = self._buckets.get(client, (float(self.burst), now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            ok = tokens >= 1
            self._buckets[client] = (tokens - ok, now)
            return ok


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def host_warning(host: str) -> str | None:
    """The warning printed when serving beyond this machine (None for loopback)."""
    if is_loopback(host):
        return None
    return (f"clipft: warning: serving on {host}: anyone who can reach this address can search and view "
            f"the indexed photos (there is no login); use --host 127.0.0.1 to keep them to this machine")


# --------------------------------------------------------------------------- parameters

def _int_param(name: str, default: int, lo: int, hi: int) -> int:
    raw = request.args.get(name)
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 9:  # "²".isdigit() is True, int("²") fails
        raise ApiError(400, f"{name} must be a whole number from {lo} to {hi}, got {raw[:20]!r}")
    value = int(raw)
    if not lo <= value <= hi:
        raise ApiError(400, f"{name} must be from {lo} to {hi}, got {value}")
    return value


def _parse_id(raw: str) -> int:
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 18:
        raise ApiError(400, f"image id must be a positive whole number, got {raw[:20]!r}")
    return int(raw)


def _served(indexes: list[Served], name: str = "index") -> Served:
    return indexes[_int_param(name, 0, 0, len(indexes) - 1)]


def _row(s: Served, image_id: int) -> int:
    try:
        return s.idx.row_of(image_id)
    except KeyError:
        raise ApiError(404, f"no image with id {image_id} in this index") from None


def _results(s: Served, hits, t0: float) -> Response:
    return jsonify(results_answer(s.idx, hits, t0))


def indexed_file(idx: LoadedIndex, row: int) -> Path:
    """The real path of an indexed image, refused (ApiError 404) unless it resolves, symlinks followed,
    to a regular file inside the indexed folder."""
    rel = Path(idx.paths[row])
    root = idx.root.resolve()
    if rel.is_absolute() or ".." in rel.parts:
        raise ApiError(404, "image path outside the indexed folder")
    try:
        real = (root / rel).resolve(strict=True)
    except (OSError, RuntimeError):
        raise ApiError(404, "image file is gone (rerun `clipft index`)") from None
    if not real.is_relative_to(root) or not real.is_file() or real.suffix.lower() not in MIME:
        raise ApiError(404, "image path outside the indexed folder")
    return real


def _decode_thumbnail(path: Path) -> Image.Image:
    """path's image reduced to at most THUMB_PX a side, decoding at most THUMB_MAX_PIXELS pixels
    (ApiError 413 above that, 404 when it does not decode)."""
    try:
        with Image.open(path) as im:
            if im.format == "JPEG":
                im.draft("RGB", (THUMB_PX, THUMB_PX))  # decode at 1/2, 1/4 or 1/8 scale: fewer pixels
            w, h = im.size
            if w * h > THUMB_MAX_PIXELS:
                raise ApiError(413, f"image too large for a thumbnail ({w} x {h} pixels, at most "
                                    f"{THUMB_MAX_PIXELS // 1_000_000} megapixels)")
            im = im.convert("RGB")
            im.thumbnail((THUMB_PX, THUMB_PX))
            return im
    except Image.DecompressionBombError:  # PIL's own limit (2 x Image.MAX_IMAGE_PIXELS), hit in open()
        raise ApiError(413, "image too large for a thumbnail (a decompression bomb)") from None
    except (OSError, ValueError, SyntaxError, EOFError):
        raise ApiError(404, "image no longer decodes (rerun `clipft index`)") from None


def _thumbnail(s: Served, row: int) -> tuple[bytes | Path, str]:
    """A JPEG thumbnail, cached in INDEX/thumbs/ under the id and content hash (so an edited photo
    gets a new one); made in memory when the index folder is not writable. The file must still be
    there (a cached thumbnail of a deleted photo is not served); THUMB_WORKERS decode at once."""
    idx = s.idx
    real = indexed_file(idx, row)  # ApiError 404 when the photo is gone
    cache = idx.index_dir / "thumbs" / f"{int(idx.ids[row])}-{idx.sha256[row][:16]}.jpg"
    if cache.is_file():
        return cache, "image/jpeg"
    if not _thumb_slots.acquire(timeout=THUMB_WAIT_S):
        raise ApiError(503, "busy making thumbnails; try again")
    try:
        im = _decode_thumbnail(real)
    finally:
        _thumb_slots.release()
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=85)
    try:
        cache.parent.mkdir(exist_ok=True)
        tmp = cache.with_name(f".{cache.name}.{threading.get_ident()}.tmp")
        tmp.write_bytes(buf.getvalue())
        os.replace(tmp, cache)
    except OSError:
        pass  # read-only index folder: serve it uncached
    return buf.getvalue(), "image/jpeg"


# --------------------------------------------------------------------------- app

def _install_guards(app: Flask, limiter: RateLimiter, loopback_only: bool) -> None:
    """Read-only methods, the loopback Host check, the rate limit, security headers, JSON errors."""
    @app.before_request
    def _guard():
        if request.method not in ("GET", "HEAD"):
            raise ApiError(405, "this server is read-only")
        try:
            host = urlsplit("//" + request.host).hostname or ""  # "[::1]:8000" -> "::1"
        except ValueError:
            host = ""
        if loopback_only and not is_loopback(host):
            raise ApiError(403, f"host {host[:50]!r} refused: this server answers only on its loopback address")
        if not limiter.allow(request.remote_addr or "?"):
            raise ApiError(429, "too many requests; slow down")

    @app.after_request
    def _headers(resp: Response) -> Response:
        resp.headers["X-Content-Type-Options"] = "nosniff"
        resp.headers["X-Frame-Options"] = "DENY"
        resp.headers["Referrer-Policy"] = "no-referrer"
        resp.headers["Content-Security-Policy"] = "default-src 'self'; img-src 'self'; object-src 'none'"
        return resp

    @app.errorhandler(ApiError)
    def _api_error(e: ApiError):
        return jsonify({"error": str(e), "status": e.status}), e.status

    @app.errorhandler(HTTPException)
    def _http_error(e: HTTPException):
        return jsonify({"error": e.description or e.name, "status": e.code}), e.code


def create_app(indexes: list[Served], rate: float = 100.0, burst: int = 300, loopback_only: bool = True) -> Flask:
    """The Flask app over `indexes` (the page shows them side by side). `rate`/`burst`: requests per
    second per client; `loopback_only`: refuse non-loopback Host headers (see the module docstring)."""
    if not indexes:
        raise ValueError("serve needs at least one index")
    app = Flask(__name__, static_folder=str(STATIC), static_url_path="/static")
    app.config["MAX_CONTENT_LENGTH"] = 1024  # nothing is uploaded: GET only
    _install_guards(app, RateLimiter(rate, burst), loopback_only)

    @app.get("/")
    def page():
        return send_file(STATIC / "index.html", mimetype="text/html", max_age=0)

    @app.get("/api/indexes")
    def api_indexes():
        return jsonify({"indexes": [{"index": i, "model": s.idx.model, "images": len(s.idx),
                                     "root": s.idx.root.name} for i, s in enumerate(indexes)]})

    @app.get("/api/search")
    def api_search():
        t0 = time.perf_counter()
        s = _served(indexes)
        q = request.args.get("q", "").strip()
        if not q:
            raise ApiError(400, "empty query: give q=TEXT")
        if len(q) > MAX_QUERY_CHARS:
            raise ApiError(400, f"query too long ({len(q)} characters, at most {MAX_QUERY_CHARS})")
        k = _int_param("k", 20, 1, MAX_K)
        return _results(s, search_text(s.idx, s.model, q, k), t0)

    @app.get("/api/similar/<raw_id>")
    def api_similar(raw_id: str):
        t0 = time.perf_counter()
        src, k = _served(indexes), _int_param("k", 20, 1, MAX_K)
        row = _row(src, _parse_id(raw_id))
        dst = _served(indexes, "target") if "target" in request.args else src
        if dst is src:
            return _results(src, search_similar(src.idx, int(src.idx.ids[row]), k), t0)
        other = dst.idx.row_of_path(src.idx.paths[row])  # the same file, embedded by the other model
        if other is None:
            raise ApiError(404, f"{src.idx.paths[row]} is not in index {request.args['target']}")
        return _results(dst, top_k(dst.idx, dst.idx.emb[other], k, exclude=other), t0)

    @app.get("/api/duplicates")
    def api_duplicates():
        s = _served(indexes)
        raw = request.args.get("threshold", "0.95")
        try:
            t = float(raw)
        except ValueError:
            raise ApiError(400, f"threshold must be a number, got {raw[:20]!r}") from None
        if not (math.isfinite(t) and MIN_THRESHOLD <= t <= 1.0):
            raise ApiError(400, f"threshold must be from {MIN_THRESHOLD} to 1, got {raw[:20]}")
        t = round(t, 4)
        if t not in s.duplicates:
            s.duplicates[t] = duplicate_groups(s.idx, t)
        return jsonify(duplicates_answer(s.idx, t, s.duplicates[t]))

    @app.get("/image/<raw_id>")
    def image(raw_id: str):
        s = _served(indexes)
        real = indexed_file(s.idx, _row(s, _parse_id(raw_id)))
        return send_file(real, mimetype=MIME[real.suffix.lower()], max_age=3600)

    @app.get("/thumb/<raw_id>")
    def thumb(raw_id: str):
        s = _served(indexes)
        data, mime = _thumbnail(s, _row(s, _parse_id(raw_id)))
        return send_file(data if isinstance(data, Path) else io.BytesIO(data), mimetype=mime, max_age=3600)

    return app


def open_indexes(paths: list[str | Path], device: str = "cpu", query_encoder: str | None = None) -> list[Served]:
    """Each index with the model that built it (reloaded from its recorded source); text queries go
    through `query_encoder` where given (clipft.query_encoder)."""
    from .query import load_index, load_query_model
    served = []
    for path in paths:
        idx = load_index(path)
        served.append(Served(idx, load_query_model(idx, device=device, query_encoder=query_encoder)))
    return served


def serve(app: Flask, host: str = "127.0.0.1", port: int = 8000, on_ready=None) -> None:
    """Run the app on host:port (threaded werkzeug server) until interrupted."""
    from werkzeug.serving import make_server
    server = make_server(host, port, app, threaded=True)
    if on_ready is not None:
        on_ready(server.server_port)
    try:
        server.serve_forever()
    finally:
        server.server_close()
