"""The search page in a real browser: Debian's headless Chromium driven by selenium against
`clipft serve` on a free loopback port. Types a query, waits for the grid, checks the expected image
is in it, clicks "more like this", opens a bookmarked search, and saves screenshots."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM, CHROMEDRIVER = shutil.which("chromium") or "/usr/bin/chromium", shutil.which("chromedriver") or "/usr/bin/chromedriver"
pytestmark = pytest.mark.skipif(not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()),
                                reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def indexed(coco_root, tmp_path_factory):
    """The 12 synthetic val photos indexed with a tiny original CLIP: (folder, index dir, model)."""
    from clipft.inference import load
    from clipft.eval.clip_baseline import save_tiny_clip_model
    from clipft.search.index import update_index
    tmp = tmp_path_factory.mktemp("page")
    folder = Path(shutil.copytree(coco_root / "val2014", tmp / "photos"))
    model_dir = save_tiny_clip_model(tmp / "clip", image_size=32)
    model = load(model_dir)
    update_index(folder, model, folder / ".clipft-index", model_source=str(model_dir), progress=False)
    return folder, folder / ".clipft-index", model


@pytest.fixture(scope="module")
def server(indexed):
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2] / "src"))
    proc = subprocess.Popen([sys.executable, "-m", "clipft", "serve", "--index", str(indexed[1]), "--port", str(port)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        try:
            urllib.request.urlopen(f"{url}/api/indexes", timeout=2).read()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail("clipft serve did not start")
            time.sleep(0.3)
    yield url
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    os.environ.setdefault("SE_OFFLINE", "true")  # selenium must not try to download a browser or driver
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1280,900",
                f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def _cards(driver, timeout: float = 60):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    WebDriverWait(driver, timeout).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".grid .card"))
    return driver.find_elements(By.CSS_SELECTOR, ".grid .card")


def _images_loaded(driver, timeout: float = 60) -> None:
    from selenium.webdriver.support.ui import WebDriverWait
    WebDriverWait(driver, timeout).until(lambda d: d.execute_script(
        "return [...document.querySelectorAll('.card img')].filter(i => i.getBoundingClientRect().top < innerHeight).every(i => i.complete && i.naturalWidth > 0)"))


def test_type_a_query_see_the_grid_then_more_like_this(browser, server, indexed, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait
    from clipft.search.query import load_index, search_similar, search_text
    _, index_dir, model = indexed
    idx = load_index(index_dir)
    expected = search_text(idx, model, "a red circle", k=1)[0]

    browser.get(server + "/")
    box = browser.find_element(By.ID, "q")
    box.clear()
    box.send_keys("a red circle", Keys.ENTER)
    cards = _cards(browser)
    assert expected.path in [c.get_attribute("data-path") for c in cards]
    assert cards[0].get_attribute("data-path") == expected.path
    assert browser.current_url.endswith("/?q=a%20red%20circle")  # the search is bookmarkable
    _images_loaded(browser)
    browser.save_screenshot(str(tmp_path / "search.png"))

    first_id = int(cards[0].get_attribute("data-id"))
    cards[0].find_element(By.CSS_SELECTOR, ".more-button").click()
    WebDriverWait(browser, 60).until(lambda d: d.find_element(By.ID, "status").text.startswith(f"more like #{first_id}:"))
    cards = _cards(browser)
    ids = [int(c.get_attribute("data-id")) for c in cards]
    assert first_id not in ids
    assert ids[0] == search_similar(idx, first_id, k=1)[0].id
    _images_loaded(browser)
    browser.save_screenshot(str(tmp_path / "similar.png"))
    assert (tmp_path / "search.png").stat().st_size > 1000 and (tmp_path / "similar.png").read_bytes()[:4] == b"\x89PNG"


def test_a_bookmarked_search_and_the_duplicates_view(browser, server, indexed):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    browser.get(server + "/?q=two%20blue%20squares")
    assert len(_cards(browser)) == 12
    assert browser.find_element(By.ID, "q").get_attribute("value") == "two blue squares"
    threshold = browser.find_element(By.ID, "threshold")
    threshold.clear()
    threshold.send_keys("0.5")
    browser.find_element(By.ID, "duplicates-button").click()
    WebDriverWait(browser, 60).until(lambda d: d.find_element(By.ID, "status").text.startswith("near-duplicates"))
    assert browser.find_elements(By.CSS_SELECTOR, ".group .card")  # a tiny random CLIP groups at 0.5


def test_an_error_is_shown_not_thrown(browser, server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    browser.get(server + "/?similar=999999")
    WebDriverWait(browser, 60).until(lambda d: "no image with id 999999" in d.find_element(By.ID, "status").text)
    assert "error" in browser.find_element(By.ID, "status").get_attribute("class")
