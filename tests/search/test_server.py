"""clipft.search.server: the HTTP API's answers, its errors (JSON, 4xx) and the security cases:
path traversal, absolute paths, symlinks out of the folder, huge k, non-numeric ids, over-long
queries, writes, foreign Host headers and a flood of requests."""

from __future__ import annotations

import contextlib
import os

import pytest
from PIL import Image

from clipft.search.index import default_index_dir, update_index
from clipft.search.query import load_index
from clipft.search.server import MAX_K, MAX_QUERY_CHARS, RateLimiter, Served, create_app, host_warning

from .fake import FakeModel, draw


@pytest.fixture
def indexed(photos, fake_model):
    update_index(photos, fake_model, progress=False)
    return photos


def _client(*served, **kw):
    app = create_app(list(served), **kw)
    app.testing = True
    return app.test_client()


@pytest.fixture
def client(indexed, fake_model):
    return _client(Served(load_index(default_index_dir(indexed)), fake_model))


def _id_of(client, path: str) -> int:
    hits = client.get(f"/api/search?q=x&k={MAX_K}").get_json()["results"]
    return next(h["id"] for h in hits if h["path"] == path)


def test_search_answers_ranked_results_with_model_and_time(client):
    r = client.get("/api/search?q=red&k=3")
    assert r.status_code == 200
    body = r.get_json()
    assert set(body) == {"results", "model", "took_ms"} and body["model"] == "fake-colour-fake-1"
    assert len(body["results"]) == 3 and set(body["results"][0]) == {"id", "path", "score"}
    assert [h["path"].split("/")[-1].split("_")[0] for h in body["results"][:2]] == ["red", "red"]
    scores = [h["score"] for h in body["results"]]
    assert scores == sorted(scores, reverse=True)


def test_similar_and_duplicates(client, indexed):
    rid = _id_of(client, "green_01.png")
    body = client.get(f"/api/similar/{rid}?k=4").get_json()
    assert len(body["results"]) == 4 and rid not in [h["id"] for h in body["results"]]
    assert body["results"][0]["path"].split("/")[-1].startswith("green")
    groups = client.get("/api/duplicates?threshold=0.999").get_json()["groups"]
    assert groups == []


def test_thumb_and_image_bytes_by_id(client, indexed):
    rid = _id_of(client, "green_01.png")
    r = client.get(f"/image/{rid}")
    assert r.status_code == 200 and r.mimetype == "image/png"
    assert r.data == (indexed / "green_01.png").read_bytes()
    t = client.get(f"/thumb/{rid}")
    assert t.status_code == 200 and t.mimetype == "image/jpeg" and t.data[:2] == b"\xff\xd8"
    assert len(list((default_index_dir(indexed) / "thumbs").glob(f"{rid}-*.jpg"))) == 1  # cached
    assert client.get(f"/thumb/{rid}").data == t.data


def test_a_relative_index_path_serves_thumbnails(indexed, fake_model, monkeypatch):
    monkeypatch.chdir(indexed)  # `clipft serve` with its default --index .clipft-index
    c = _client(Served(load_index(".clipft-index"), fake_model))
    rid = _id_of(c, "green_01.png")
    for _ in range(2):  # made, then from the cache
        r = c.get(f"/thumb/{rid}")
        assert r.status_code == 200 and r.data[:2] == b"\xff\xd8"


def test_page_and_static_files(client):
    r = client.get("/?q=red")
    assert r.status_code == 200 and b'id="q"' in r.data and b"/static/app.js" in r.data
    assert client.get("/static/app.js").status_code == 200
    assert "default-src 'self'" in r.headers["Content-Security-Policy"]


@pytest.mark.parametrize("url, status", [
    ("/api/search", 400), ("/api/search?q=", 400), ("/api/search?q=%20%20", 400),
    (f"/api/search?q={'a' * (MAX_QUERY_CHARS + 1)}", 400),
    ("/api/search?q=red&k=0", 400), (f"/api/search?q=red&k={MAX_K + 1}", 400),
    ("/api/search?q=red&k=99999999999999999999", 400), ("/api/search?q=red&k=-5", 400),
    ("/api/search?q=red&k=ten", 400), ("/api/search?q=red&k=1e3", 400), ("/api/search?q=red&index=7", 400),
    ("/api/similar/abc", 400), ("/api/similar/-1", 400), ("/api/similar/1.5", 400),
    ("/api/similar/999999", 404), ("/api/similar/1?k=100000", 400),
    ("/api/duplicates?threshold=abc", 400), ("/api/duplicates?threshold=nan", 400),
    ("/api/duplicates?threshold=0.1", 400), ("/api/duplicates?threshold=2", 400),
    ("/image/999999", 404), ("/thumb/999999", 404), ("/image/abc", 400), ("/thumb/0x10", 400),
    ("/image/..%2F..%2F..%2Fetc%2Fpasswd", 404), ("/image/../../etc/passwd", 404),
    ("/image/%2Fetc%2Fpasswd", 404), ("/image//etc/passwd", 404), ("/thumb/..", 400),
    ("/static/../../search/index.py", 404), ("/static/%2e%2e/index.py", 404),
    ("/nothing-here", 404),
])
def test_errors_are_json_with_a_4xx_status(client, url, status):
    r = client.get(url)
    assert r.status_code == status, (url, r.status_code, r.data[:200])
    assert r.is_json and r.get_json()["error"]
    assert b"root:" not in r.data


def test_read_only(client):
    for method in ("post", "put", "delete", "patch"):
        r = getattr(client, method)("/api/search?q=red", data=b"x")
        assert r.status_code == 405 and r.is_json


def test_an_indexed_file_turned_into_a_symlink_out_of_the_folder_is_refused(client, indexed, tmp_path):
    secret = tmp_path / "secret.png"
    draw(secret, "red", seed=99)
    rid = _id_of(client, "green_01.png")
    (indexed / "green_01.png").unlink()
    os.symlink(secret, indexed / "green_01.png")
    assert client.get(f"/image/{rid}").status_code == 404
    assert client.get(f"/thumb/{rid}").status_code == 404


def test_a_tampered_database_path_cannot_escape(indexed, fake_model, tmp_path):
    draw(tmp_path / "outside.png", "red", seed=98)
    import sqlite3
    idx = load_index(default_index_dir(indexed))  # paths are read from the database per request
    with contextlib.closing(sqlite3.connect(default_index_dir(indexed) / "meta.sqlite")) as db, db:
        db.execute("UPDATE files SET path = ? WHERE id = ?", ("../outside.png", int(idx.ids[0])))
        db.execute("UPDATE files SET path = ? WHERE id = ?", (str(tmp_path / "outside.png"), int(idx.ids[1])))
    c = _client(Served(idx, fake_model))
    for rid in idx.ids[:2]:
        assert c.get(f"/image/{rid}").status_code == 404


def test_symlinks_out_of_the_folder_are_not_indexed(photos, fake_model, tmp_path):
    draw(tmp_path / "outside.png", "red", seed=97)
    os.symlink(tmp_path / "outside.png", photos / "link.png")
    os.symlink(tmp_path, photos / "linkdir")
    update_index(photos, fake_model, progress=False)
    idx = load_index(default_index_dir(photos))
    assert "link.png" not in idx.paths and not any(p.startswith("linkdir") for p in idx.paths)


def test_a_foreign_host_header_is_refused_on_loopback(client):
    assert client.get("/api/indexes", headers={"Host": "evil.example:8000"}).status_code == 403
    assert client.get("/api/indexes", headers={"Host": "localhost:8000"}).status_code == 200
    assert client.get("/api/indexes", headers={"Host": "[::1]:8000"}).status_code == 200


def test_the_rate_limiter_refills_per_client():
    now = [0.0]
    limiter = RateLimiter(rate=5, burst=20, clock=lambda: now[0])
    assert sum(limiter.allow("a") for _ in range(100)) == 20
    now[0] += 1.0
    assert sum(limiter.allow("a") for _ in range(100)) == 5 and limiter.allow("b")


def test_a_flood_of_requests_is_refused_cleanly(indexed, fake_model):
    c = _client(Served(load_index(default_index_dir(indexed)), fake_model), rate=1, burst=20)
    responses = [c.get("/api/search?q=red&k=5") for _ in range(120)]
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 429} and codes.count(429) >= 90 and all(r.is_json for r in responses)
    assert "too many requests" in next(r for r in responses if r.status_code == 429).get_json()["error"]


def test_two_indexes_side_by_side(indexed, fake_model):
    other = FakeModel("fake-2")
    update_index(indexed, other, indexed / ".clipft-index-2", progress=False)
    c = _client(Served(load_index(default_index_dir(indexed)), fake_model),
                Served(load_index(indexed / ".clipft-index-2"), other))
    assert [i["model"] for i in c.get("/api/indexes").get_json()["indexes"]] == ["fake-colour-fake-1", "fake-colour-fake-2"]
    b = c.get("/api/search?q=red&k=2&index=1").get_json()
    assert b["model"] == "fake-colour-fake-2" and len(b["results"]) == 2
    rid0 = _id_of(c, "green_01.png")
    cross = c.get(f"/api/similar/{rid0}?k=3&index=0&target=1").get_json()
    assert cross["model"] == "fake-colour-fake-2" and "green_01.png" not in [h["path"] for h in cross["results"]]


def test_host_warning():
    assert host_warning("127.0.0.1") is None and host_warning("localhost") is None and host_warning("::1") is None
    assert "anyone" in host_warning("0.0.0.0") and "--host 127.0.0.1" in host_warning("192.168.1.5")


def test_unreadable_thumb_is_a_clean_404(client, indexed):
    rid = _id_of(client, "green_01.png")
    (indexed / "green_01.png").write_bytes(b"garbage")
    assert client.get(f"/thumb/{rid}").status_code == 404
    assert Image  # PIL imported for the fixtures' formats


# --------------------------------------------------------------------------- hostile and odd requests

def test_non_ascii_digits_are_a_clean_400(client):
    for url in ("/api/search?q=red&k=%C2%B2", "/api/search?q=red&k=%D9%A3", "/thumb/%C2%B2", "/api/similar/%D9%A3"):
        r = client.get(url)
        assert r.status_code in (400, 404) and "error" in r.get_json(), url


def test_a_decompression_bomb_swapped_into_an_indexed_file_is_a_clean_4xx(client, indexed):
    rid = _id_of(client, "trip/red_00.jpg")
    Image.new("1", (16_000, 16_000)).save(indexed / "trip" / "red_00.jpg", format="PNG")  # 256 Mpx, tiny file
    r = client.get(f"/thumb/{rid}")
    assert 400 <= r.status_code < 500 and "error" in r.get_json()


def test_a_cached_thumbnail_of_a_deleted_file_is_not_served(client, indexed):
    rid = _id_of(client, "green_01.png")
    assert client.get(f"/thumb/{rid}").status_code == 200  # now cached
    (indexed / "green_01.png").unlink()
    r = client.get(f"/thumb/{rid}")
    assert r.status_code == 404 and "gone" in r.get_json()["error"]


def test_a_huge_png_thumbnail_decodes_nothing_over_the_pixel_cap(client, indexed, monkeypatch):
    """12,000 x 12,000 PNG: refused (413) before its pixels are decoded; nothing larger than the cap loads."""
    from clipft.search import server
    rid = _id_of(client, "blue_02.webp")
    Image.new("1", (12_000, 12_000)).save(indexed / "blue_02.webp", format="PNG")
    loaded = []
    real_load = Image.Image.load
    monkeypatch.setattr(Image.Image, "load", lambda self: (loaded.append(self.size), real_load(self))[1])
    r = client.get(f"/thumb/{rid}")
    assert r.status_code == 413 and "too large" in r.get_json()["error"]
    assert all(w * h <= server.THUMB_MAX_PIXELS for w, h in loaded)


def test_a_big_jpeg_thumbnail_is_decoded_reduced(client, indexed, monkeypatch):
    from clipft.search import server
    monkeypatch.setattr(server, "THUMB_MAX_PIXELS", 1_000_000)
    rid = _id_of(client, "trip/red_00.jpg")
    Image.new("RGB", (4000, 3000), (200, 10, 10)).save(indexed / "trip" / "red_00.jpg", quality=80)  # 12 Mpx
    loaded = []
    real_load = Image.Image.load
    monkeypatch.setattr(Image.Image, "load", lambda self: (loaded.append(self.size), real_load(self))[1])
    r = client.get(f"/thumb/{rid}")
    assert r.status_code == 200
    with Image.open(__import__("io").BytesIO(r.data)) as im:
        assert max(im.size) <= server.THUMB_PX
    assert loaded and all(w * h <= 1_000_000 for w, h in loaded)  # draft: 1/8 scale, 500 x 375
