"""report.md -> report.html (self-contained, print-friendly) -> report.pdf (headless Chromium).

The Markdown stays the source of truth: the HTML is rendered from it (markdown-it, CommonMark plus
tables), every picture inlined as a data: URI so the file has no external reference, and the PDF is
Chromium's own print of that HTML (`--print-to-pdf`), not drawn by hand.
"""

from __future__ import annotations

import base64
import html
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from .errors import ReportError

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# Flags of a clean, offline, one-shot headless run (no profile reuse, no background traffic).
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--no-pdf-header-footer")

CSS = """
body { font-family: "DejaVu Sans", Helvetica, Arial, sans-serif; font-size: 10.5pt; line-height: 1.4;
       max-width: 190mm; margin: 0 auto; padding: 8mm; color: #111; }
h1 { font-size: 18pt; border-bottom: 2px solid #333; padding-bottom: 2mm; }
h2 { font-size: 14pt; border-bottom: 1px solid #999; margin-top: 8mm; break-after: avoid; }
h3, h4 { font-size: 11.5pt; break-after: avoid; }
table { border-collapse: collapse; margin: 3mm 0; font-size: 9pt; break-inside: avoid; }
th, td { border: 1px solid #bbb; padding: 1mm 2mm; vertical-align: top; }
th { background: #eee; }
img { display: block; max-width: 100%; max-height: 240mm; margin: 3mm auto; break-inside: avoid; }
p:has(> img) { break-inside: avoid; }
code { font-size: 9pt; background: #f3f3f3; padding: 0 1mm; overflow-wrap: anywhere; }
pre { background: #f6f6f6; border: 1px solid #ddd; padding: 2mm; font-size: 8pt; white-space: pre-wrap;
      overflow-wrap: anywhere; }
pre code { background: none; padding: 0; }
blockquote { border-left: 3px solid #c60; margin: 3mm 0; padding: 1mm 4mm; background: #fff6ee; }
summary { font-weight: bold; }
details pre { column-count: 2; column-gap: 6mm; font-size: 7pt; }
@page { size: A4; margin: 14mm 12mm; }
@media print { body { padding: 0; max-width: none; } a { color: #111; } }
"""

_IMG = re.compile(r'<img src="([^"]+)"')


def markdown_to_html(markdown: str, root: Path, title: str) -> str:
    """A complete HTML document of the report; pictures (paths relative to root) are inlined."""
    from markdown_it import MarkdownIt
    body = MarkdownIt("commonmark", {"html": True}).enable("table").render(markdown)
    body = body.replace("<details>", "<details open>")  # printed, a folded section would be lost

    def inline(m: re.Match) -> str:
        src = m.group(1)
        if src.startswith("data:"):
            return m.group(0)
        path = root / html.unescape(src)
        if not path.is_file():
            raise ReportError(f"{path}: picture linked by the report is missing")
        mime = "image/png" if path.suffix.lower() == ".png" else "image/jpeg"
        return f'<img src="data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"'

    body = _IMG.sub(inline, body)
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{html.escape(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n{body}</body>\n</html>\n")


def write_html(md_path: Path) -> Path:
    """report.md -> report.html beside it."""
    title = md_path.read_text().splitlines()[0].lstrip("# ").replace("`", "")
    out = md_path.with_suffix(".html")
    out.write_text(markdown_to_html(md_path.read_text(), md_path.parent, title))
    return out


def find_chromium() -> str | None:
    """The first Chromium-family browser on PATH."""
    return next((p for p in map(shutil.which, CHROMIUM_NAMES) if p), None)


def write_pdf(html_path: Path, timeout: float = 180.0) -> Path:
    """report.html -> report.pdf with headless Chromium's print-to-PDF (A4, the HTML's print CSS).

    Chromium is started in a session of its own and its output goes to a file, not a pipe: headless
    Chromium can stay up after printing, and its helper processes (zygote, crashpad) inherit the
    output, so waiting for the pipes to close (subprocess.run) waited for them. The PDF is done when
    Chromium exits, or when the file it prints to has stopped growing; the whole group is then ended."""
    exe = find_chromium()
    if exe is None:
        raise ReportError("--pdf needs a Chromium browser on PATH (Debian/Ubuntu: apt-get install chromium)")
    out = html_path.with_suffix(".pdf")
    tmp_out = out.with_name(out.name + ".tmp")
    tmp_out.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="clipft-chromium-") as profile:
        cmd = [exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--print-to-pdf={tmp_out}",
               html_path.resolve().as_uri()]
        log_file = Path(profile) / "chromium-output.txt"
        with open(log_file, "w+") as log_f:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log_f, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                code = _wait_for_pdf(proc, tmp_out, timeout)
            finally:
                _end_group(proc)
            log_f.seek(0)
            output = log_f.read()
    if code is None:
        tmp_out.unlink(missing_ok=True)
        raise ReportError(f"{html_path}: {exe} did not print the PDF within {timeout:.0f} s")
    if not tmp_out.is_file() or tmp_out.stat().st_size == 0:
        tmp_out.unlink(missing_ok=True)
        last = (output.strip().splitlines() or ["no output"])[-1]
        raise ReportError(f"{html_path}: {exe} failed to print the PDF (exit {code}: {last})")
    tmp_out.replace(out)
    return out


def _wait_for_pdf(proc: subprocess.Popen, pdf: Path, timeout: float, settle: float = 1.0) -> int | None:
    """Chromium's exit code, 0 once `pdf` exists and has kept its size for `settle` seconds while
    Chromium is still up, or None after `timeout` seconds without either."""
    import time
    start, last_size, since = time.monotonic(), -1, time.monotonic()
    while time.monotonic() - start < timeout:
        code = proc.poll()
        if code is not None:
            return code
        size = pdf.stat().st_size if pdf.is_file() else -1
        if size != last_size:
            last_size, since = size, time.monotonic()
        elif size > 0 and time.monotonic() - since >= settle:
            return 0  # printed; what is left of Chromium is ended by the caller
        time.sleep(0.1)
    return None


def _end_group(proc: subprocess.Popen) -> None:
    """End Chromium and every process it started (its own session), then reap it."""
    import os
    import signal
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            break
        try:
            proc.wait(timeout=3)
            break
        except subprocess.TimeoutExpired:
            continue
