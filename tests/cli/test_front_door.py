"""The front door: what a new user meets first. Argument, config, path and preset checks answer
without importing torch; a preset name is not shadowed by a folder; --version exists."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from clipft.cli.commands import build_parser

SRC = str(Path(__file__).resolve().parents[2] / "src")
HEAVY = ("torch", "sentence_transformers", "transformers", "torchvision", "matplotlib")


def imports_after(argv: list[str], cwd: Path) -> dict:
    """Run clipft.cli.main(argv) in a fresh interpreter; return its exit code, stderr/stdout and which
    heavy modules it imported."""
    code = (
        "import sys, json, io, contextlib\n"
        "from clipft.cli import main\n"
        f"argv = {argv!r}\n"
        "out, err = io.StringIO(), io.StringIO()\n"
        "with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):\n"
        "    try:\n"
        "        rc = main(argv)\n"
        "    except SystemExit as e:\n"
        "        rc = e.code\n"
        f"heavy = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "print(json.dumps({'rc': rc, 'heavy': heavy, 'out': out.getvalue(), 'err': err.getvalue()}))\n")
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def _commands() -> list[str]:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return list(sub.choices)


ARGUMENT_ERRORS = [
    ["train", "--config", "demoo", "--data", "d", "--out", "r"],  # unknown preset / missing file
    ["train", "--data", "no-such-data", "--out", "r"],  # missing data path
    ["train", "--config", "demo", "--data", "d", "--out", "r", "--set", "model.backbone=resnet152"],
    ["train", "--data", "d", "--out", "r", "--set", "train.lr=-1"],
    ["validate", "--data", "no-such-data"],
    ["evaluate", "--checkpoint", "no/best.pt", "--data", "d"],
    ["zeroshot", "--checkpoint", "no/best.pt"],
    ["download", "coco", "--out", "x", "--splits", "bogus"],  # argparse error (exit 2 through SystemExit)
    ["train", "--data", "d"],  # a required argument missing
    ["index", "no-such-folder", "--model", "m"],
    ["embed", "--model", "m", "--images", "no-such-folder", "--out", "e.safetensors"],
    ["export", "no/best.pt", "--out", "x"],
    ["nonsense-command"],
]


@pytest.mark.parametrize("argv", ARGUMENT_ERRORS, ids=[" ".join(a[:2]) + f"-{i}" for i, a in enumerate(ARGUMENT_ERRORS)])
def test_an_argument_error_answers_without_importing_torch(argv, tmp_path):
    (tmp_path / "d").mkdir()  # an (empty) data folder, so that the config is what fails
    r = imports_after(argv, tmp_path)
    assert r["rc"] == 2, r
    assert r["heavy"] == [], f"{argv}: imported {r['heavy']} before refusing ({r['err'].strip()})"
    assert "Traceback" not in r["err"]


def test_help_of_every_command_and_version_import_nothing_heavy(tmp_path):
    for argv in [["--help"], ["--version"]] + [[c, "--help"] for c in _commands()]:
        r = imports_after(argv, tmp_path)
        assert r["rc"] == 0 and r["heavy"] == [], (argv, r["heavy"])


def test_version():
    import clipft
    r = imports_after(["--version"], Path.cwd())
    assert r["out"].strip() == f"clipft {clipft.__version__}"


def test_a_preset_name_wins_over_a_folder_of_that_name(tmp_path):
    (tmp_path / "demo").mkdir()  # e.g. the folder `clipft demo --out demo` wrote
    r = imports_after(["train", "--config", "demo", "--data", "no-such-data", "--out", "r"], tmp_path)
    assert "config file not found" not in r["err"] and "no-such-data" in r["err"], r["err"]


def test_a_folder_is_never_a_config(tmp_path):
    from clipft.config import ConfigError, resolve_config_arg
    (tmp_path / "mine").mkdir()
    with pytest.raises(ConfigError, match="a folder, not a config file"):
        resolve_config_arg(str(tmp_path / "mine"))
    (tmp_path / "demo.yaml").write_text("train: {epochs: 1}\n")
    assert resolve_config_arg("demo") == ("preset", "demo")
    assert resolve_config_arg(str(tmp_path / "demo.yaml")) == ("file", str(tmp_path / "demo.yaml"))


def test_an_unknown_backbone_is_refused_by_the_config():
    from clipft.config import Config, ConfigError, load_config
    with pytest.raises(ConfigError, match="unknown backbone 'resnet152'"):
        load_config(None, ["model.backbone=resnet152"], base=Config())


def test_the_config_backbones_are_the_model_backbones():
    from clipft.config import BACKBONES
    from clipft.model import BACKBONES as MODEL_BACKBONES
    assert tuple(BACKBONES) == tuple(MODEL_BACKBONES)


def test_a_failed_download_leaves_no_lock_behind(tmp_path, capsys, monkeypatch):
    import socket
    from dataclasses import replace
    from clipft.cli.commands import main
    from clipft.data import download as dl
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there: the connection is refused
    archives = {k: replace(a, size=None, checksum=None) for k, a in dl.COCO_ARCHIVES.items()}
    root = tmp_path / "coco"
    with dl.use_hooks(archives=archives):
        assert main(["download", "coco", "--out", str(root), "--mirror", f"http://127.0.0.1:{port}",
                     "--quiet", "--retries", "0"]) == 2
    assert not (root / dl.DOWNLOADS_DIR / ".lock").exists()


def test_the_report_suggests_the_runs_own_data_path(tmp_path):
    from clipft.report.extras import reproduce_section
    run = tmp_path / "run"
    run.mkdir()
    data = tmp_path / "captions.csv"
    data.write_text("image,caption\n")
    (run / "summary.json").write_text(json.dumps({"data_root": str(data)}))
    text = "\n".join(reproduce_section(run))
    assert f"--data {data}" in text and "DATA" not in text


def test_search_prints_absolute_paths(tmp_path, capsys, monkeypatch):
    from types import SimpleNamespace
    from clipft.cli.commands import main
    from clipft.search import query as Q
    root = tmp_path / "photos"
    fake = SimpleNamespace(root=root, model="m")
    monkeypatch.setattr(Q, "load_index", lambda *a, **k: fake)
    monkeypatch.setattr(Q, "duplicates_answer", lambda idx, t: {
        "groups": [[{"id": 1, "path": "a/x.jpg"}, {"id": 2, "path": "y.jpg"}]], "model": "m", "threshold": t})
    assert main(["search", "--duplicates", "--json", "--index", str(tmp_path)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [f["path"] for f in out["groups"][0]] == [str(root / "a" / "x.jpg"), str(root / "y.jpg")]
    assert [f["relative_path"] for f in out["groups"][0]] == ["a/x.jpg", "y.jpg"]
    assert [f["id"] for f in out["groups"][0]] == [1, 2]
    assert main(["search", "--duplicates", "--index", str(tmp_path)]) == 0
    assert str(root / "a" / "x.jpg") in capsys.readouterr().out


def test_make_demo_installs_what_the_demo_needs_and_no_test_tools():
    import re
    import tomllib
    root = Path(__file__).resolve().parents[2]
    extras = tomllib.loads((root / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(d.startswith("flask") for d in extras["demo"])  # the demo ends with a `clipft serve` line
    make = (root / "Makefile").read_text()
    demo_deps = re.search(r"^demo:(.*)$", make, re.M).group(1).split()
    recipes = {m.group(1): m.group(2) for m in re.finditer(r"^(\S+):[^\n]*\n((?:\t[^\n]*\n)+)", make, re.M)}
    demo_install = "".join(recipes.get(d, "") for d in demo_deps)
    assert '".[demo]"' in demo_install and "[dev" not in demo_install and "dev," not in demo_install


def test_pdf_returns_once_printed_even_when_chromium_lingers(tmp_path, monkeypatch):
    """Headless Chromium can stay up after --print-to-pdf, and its helper processes hold the output
    pipes open: `report --pdf` kept running long after the PDF was written."""
    from clipft.report.html import write_pdf
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    pidfile = tmp_path / "pids"
    fake = bin_dir / "chromium"
    fake.write_text(f"""#!/bin/sh
for a in "$@"; do case "$a" in --print-to-pdf=*) out="${{a#--print-to-pdf=}}";; esac; done
printf '%%PDF-1.4 fake' > "$out"
sleep 30 &
echo $! >> {pidfile}
echo $$ >> {pidfile}
sleep 30
""")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    html = tmp_path / "report.html"
    html.write_text("<html><body>hi</body></html>")
    pdf = write_pdf(html, timeout=20)
    assert pdf.read_bytes().startswith(b"%PDF")
    import time
    for _ in range(50):  # the helper processes go with it (killed as a group; reaped by init)
        alive = []
        for pid in map(int, pidfile.read_text().split()):
            try:
                os.kill(pid, 0)
                alive.append(pid)
            except ProcessLookupError:
                pass
        if not alive:
            break
        time.sleep(0.1)
    assert not alive


def test_each_loss_has_its_own_panel_chance_line_and_integer_epochs():
    import math
    import matplotlib.pyplot as plt
    from clipft.eval.plots import training_curves_figure, val_loss_chance
    val = {"image_to_text": {"R@1": 10.0}, "text_to_image": {"R@1": 12.0}, "num_images": 300}
    epochs = [{"epoch": e, "train_loss": 4.0 - e / 4, "val_loss": 5.0 - e / 5, "val": val} for e in (1, 2, 3)]
    fig = training_curves_figure(epochs, batch_size=128)
    ax_train, ax_val, _ = fig.axes
    labels = lambda ax: [line.get_label() for line in ax.get_lines()]  # noqa: E731
    assert "train loss" in labels(ax_train) and "val loss" not in labels(ax_train)
    assert "val loss" in labels(ax_val)
    chance_train = [l for l in ax_train.get_lines() if l.get_label().startswith("chance")]
    chance_val = [l for l in ax_val.get_lines() if l.get_label().startswith("chance")]
    assert abs(chance_train[0].get_ydata()[0] - math.log(128)) < 1e-9
    assert abs(chance_val[0].get_ydata()[0] - val_loss_chance(300, 128)) < 1e-9
    fig.canvas.draw()
    assert all(float(t).is_integer() for t in ax_train.get_xticks())
    plt.close(fig)


def test_zero_shot_plot_without_true_classes_says_no_green_and_names_files(tmp_path, monkeypatch):
    import torch
    from PIL import Image
    from clipft.eval import plots as V
    png = tmp_path / "holiday.png"
    Image.new("RGB", (32, 32), (0, 0, 200)).save(png)
    seen = {}
    real_save = V._save

    def save(fig, path):
        seen["suptitle"] = fig._suptitle.get_text()
        seen["titles"] = [ax.get_title() for ax in fig.axes]
        return real_save(fig, path)
    monkeypatch.setattr(V, "_save", save)
    V.plot_zero_shot([{"path": png, "probs": torch.tensor([0.7, 0.3]), "target": None}], ["cat", "dog"],
                     tmp_path / "z.png")
    assert "green" not in seen["suptitle"] and any("holiday.png" in t for t in seen["titles"])
