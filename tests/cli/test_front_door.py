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


# Round two: other mistakes of the same kinds. Each answers with one line that names the input, before
# torch is imported: (argv, words the line must hold). The folder holds d/ (an empty data folder), adir/
# (an empty folder), afile (a file), ck.pt and p.png (binary files) and empty.yaml (an empty file).
MISTAKES = [
    (["train", "--config", "p.png", "--data", "d", "--out", "r"], "p.png: not a YAML config file"),
    (["train", "--config", "ck.pt", "--data", "d", "--out", "r"], "ck.pt: not a YAML config file"),
    (["train", "--config", "empty.yaml", "--data", "d", "--out", "r"], "empty.yaml: an empty config file"),
    (["train", "--config", "afile", "--data", "d", "--out", "r"], "afile: not a clipft config"),
    (["train", "--data", "d", "--out", "r", "--lr", "0.1"], "--set train.lr=0.1"),
    (["train", "--data", "d", "--out", "r", "--epochs=3"], "--set train.epochs=3"),
    (["train", "--data", "d", "--out", "afile"], "afile: a file, not a folder"),
    (["train", "--data", "d", "--out", "afile/run"], "afile: a file, not a folder"),
    (["make-data", "shapes", "--out", "afile"], "afile: a file, not a folder"),
    (["shard", "d", "--out", "afile"], "afile: a file, not a folder"),
    (["ablate", "--out", "afile", "--quick"], "afile: a file, not a folder"),
    (["demo", "--out", "afile"], "afile: a file, not a folder"),
    (["export", "ck.pt", "--out", "afile"], "afile: a file, not a folder"),
    (["index", "adir", "--model", "m", "--index", "afile"], "afile: a file, not a folder"),
    (["validate", "--data", "d", "--out", "adir"], "adir: a folder, not a file"),
    (["evaluate", "--checkpoint", "ck.pt", "--data", "d", "--out", "adir"], "adir: a folder, not a file"),
    (["evaluate", "--checkpoint", "ck.pt", "--data", "d", "--out", "afile/m.json"], "afile: a file, not a folder"),
    (["inspect-data", "--data", "d", "--out", "adir"], "adir: a folder, not a file"),
    (["embed", "--model", "m", "--images", "adir", "--out", "adir"], "adir: a folder, not a file"),
    (["visualize", "heatmap", "--checkpoint", "ck.pt", "--data", "d", "--out", "afile/x.png"],
     "afile: a file, not a folder"),
    (["evaluate", "--checkpoint", "ck.pt", "--data", "d", "--device", "gpu"], "--device"),
    (["index", "adir", "--model", "m", "--device", "gpu"], "--device"),
    (["search", "cat", "--device", "cuda:x"], "--device"),
    (["evaluate", "--checkpoint", "adir", "--data", "d"], "adir: a folder, not a checkpoint file"),
    (["index", "afile", "--model", "m"], "afile: not a folder"),
    (["embed", "--model", "m", "--images", "afile", "--out", "e.safetensors"], "afile: not a folder"),
    (["report", "afile"], "afile: not a directory"),
    (["search", "cat", "--index", "no-such-index"], "no-such-index: no clipft index here"),
    (["zeroshot", "--checkpoint", "ck.pt", "--image", "no-such.jpg", "--labels", "a", "b"],
     "no-such.jpg: no such file"),
    (["zeroshot", "--checkpoint", "ck.pt", "--data", "d", "--labels-from", "shape"], "shapes:shape"),
    (["export", "ck.pt", "--out", "e", "--quantize", "int8"], "--quantize int8 needs --onnx"),
    (["report", "adir", "--notes", "nope.md"], "nope.md: notes file not found"),
    (["report", "adir", "--compare", "adir", "nope"], "nope: no such run directory"),
    (["report", "adir", "--ablation", "nope"], "nope: no such study directory"),
    (["ablate", "--list", "--configs-file", "nope.yaml"], "nope.yaml: configurations file not found"),
    (["evaluate", "--checkpoint", "ck.pt", "--data", "d", "--karpathy", "nope.json"],
     "nope.json: Karpathy split file not found"),
    (["search", "--image", "nope.jpg", "--index", "adir"], "nope.jpg: no such image file"),
    (["serve", "--index", "adir", "--index", "nope"], "nope: no clipft index here"),
    (["train", "--data", "d", "--val-data", "nope.csv", "--out", "r"], "nope.csv: no such file or directory"),
    (["demo", "--out", "o", "--data", "afile"], "afile: a file, not a folder"),
    (["demo", "--out", "o", "--data", "photos"], "photos: not a COCO-layout dataset"),
    (["index", "adir", "--model", "runs/x/best.pt"], "runs/x/best.pt: not found"),
    # a config mistake on a command other than train (train already checked its config first)
    *[(argv + ["--set", "trian.lr=1"], "unknown config section 'trian'") for argv in (
        ["validate", "--data", "d"], ["cache-text", "--data", "d"], ["prepare-images", "--data", "d"],
        ["shard", "d", "--out", "s"], ["inspect-data", "--data", "d"], ["ablate", "--out", "a", "--data", "d"],
        ["demo", "--out", "o"], ["evaluate", "--checkpoint", "ck.pt", "--data", "d"],
        ["zeroshot", "--checkpoint", "ck.pt", "--data", "d", "--labels-from", "shapes"],
        ["visualize", "heatmap", "--checkpoint", "ck.pt", "--data", "d"])],
    (["validate", "--data", "d", "--config", "p.png"], "p.png: not a YAML config file"),
    (["search", "--index", "adir"], "search: give one of QUERY, --image PATH or --duplicates"),
    (["search", "--duplicates", "--threshold", "2", "--index", "adir"], "--threshold is a cosine from -1 to 1"),
    (["zeroshot", "--checkpoint", "ck.pt"], "zeroshot: give either --image PATH ... or --data ROOT"),
    (["zeroshot", "--checkpoint", "ck.pt", "--image", "p.png"], "give the class names with --labels"),
    (["zeroshot", "--checkpoint", "ck.pt", "--data", "d"], "with --labels-from"),
    (["ablate", "--data", "d"], "ablate: --out DIR is required"),
    (["ablate", "--out", "study", "--configs", "bogus"], "unknown configuration(s) 'bogus'"),
    (["train", "--data", "d", "--out", "./d/"], "./d/: the dataset folder (--data)"),
    (["train", "--data", "ck.pt", "--out", "r"], "ck.pt: a model file, not a dataset"),
    (["evaluate", "--checkpoint", "p.png", "--data", "d"], "p.png cannot be read: not a readable checkpoint"),
    (["export", "afile", "--out", "e"], "afile cannot be read: not a readable checkpoint"),
    (["evaluate", "--checkpoint", "ck.pt", "--data", "ck.pt"], "ck.pt: a model file, not a dataset"),
    (["validate", "--data", "p.png"], "p.png: an image, not a dataset"),
    (["cache-text", "--data", "d", "--val-data", "empty.yaml"], "empty.yaml: a config file, not a dataset"),
    (["report", "adir", "--data", "nope", "--no-draw"], "nope: no such file or directory"),
    (["export", "ck.pt", "--out", "e", "--onnx", "--check-images", "afile"], "afile: not a folder"),
    (["demo", "--out", "o", "--set", "train.epochs=0"], "train.epochs must be in [1, 100000], got 0"),
    (["evaluate", "--checkpoint", "ck.pt", "--data", "d", "--set", "eval.ks=x"], "eval.ks: expected an integer"),
    (["embed", "--model", "export/", "--images", "adir", "--out", "e.safetensors"], "export/: not found"),
]


@pytest.mark.parametrize("argv,words", MISTAKES, ids=[f"{i}-{' '.join(a[:1])}" for i, (a, _) in enumerate(MISTAKES)])
def test_a_mistake_gets_one_true_line_before_torch(argv, words, tmp_path):
    for d in ("d", "adir"):
        (tmp_path / d).mkdir()
    (tmp_path / "afile").write_text("hello\n")
    import zipfile
    with zipfile.ZipFile(tmp_path / "ck.pt", "w") as z:  # a zip, as every torch.save file is
        z.writestr("ck/data.pkl", b"\x80\x02}q\x00.")
    (tmp_path / "p.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    (tmp_path / "empty.yaml").write_text("")
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "holiday.jpg").write_bytes(b"\xff\xd8")
    r = imports_after(argv, tmp_path)
    err = r["err"].strip()
    assert r["rc"] == 2, r
    assert words in err, err
    assert r["heavy"] == [], f"{argv}: imported {r['heavy']} before refusing ({err})"
    assert "unexpected" not in err and "Traceback" not in err
    lines = [ln for ln in err.splitlines() if not ln.startswith("usage:") and not ln.startswith(" ")]
    assert len(lines) == 1, err
    assert not (tmp_path / "afile").is_dir() and not (tmp_path / "adir.tmp").exists()
    assert [p.name for p in (tmp_path / "photos").iterdir()] == ["holiday.jpg"]  # nothing written into it
    assert not (tmp_path / "o").exists()  # the demo wrote its dataset before refusing a bad --set


def test_no_cuda_names_the_device_not_train_device(monkeypatch):
    import torch
    from clipft.config import ConfigError
    from clipft.runtime import resolve_device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError) as e:
        resolve_device("cuda")
    assert str(e.value).startswith("device 'cuda': CUDA is not available") and "--device cpu" in str(e.value)


def test_a_config_file_of_comments_only_is_the_defaults(tmp_path):
    from clipft.config import Config, load_config
    f = tmp_path / "c.yaml"
    f.write_text("# train:\n#   epochs: 3\n")
    assert load_config(f) == Config()


def test_embedding_an_empty_folder_is_refused(tmp_path):
    from clipft.embed import embed_folder
    from clipft.config import ConfigError
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no images"):
        embed_folder(object(), tmp_path / "empty", tmp_path / "e.safetensors")
    assert not (tmp_path / "e.safetensors").exists()


def test_a_picture_named_without_a_suffix_is_written_and_reported_as_png(tmp_path):
    import matplotlib.pyplot as plt
    from clipft.eval.plots import _save
    fig = plt.figure()
    written = _save(fig, tmp_path / "samples")  # `clipft inspect-data --out samples` printed "wrote samples"
    assert written == tmp_path / "samples.png" and written.is_file()
    fig = plt.figure()
    assert _save(fig, tmp_path / "run.v1").name == "run.v1.png"  # savefig refused the unknown suffix 'v1'
    assert _save(plt.figure(), tmp_path / "a.PNG").name == "a.PNG"


def test_api_mistakes_get_one_clear_line():
    import torch
    from clipft import load, similarity
    from clipft.inference import ImageTextModel, ModelError
    with pytest.raises(ModelError, match="no-such-dir/: not found"):  # was Hugging Face's repo-id message
        load("no-such-dir/")
    with pytest.raises(ModelError, match="no-such.pt: not found"):
        load("runs/no-such.pt")
    with pytest.raises(ModelError, match="device 'gpu': not a device"):  # was torch's RuntimeError
        load("no-such.pt", device="gpu")
    with pytest.raises(ValueError, match="a list of class names"):  # "red" was read as classes r, e, d
        ImageTextModel.zero_shot(object(), ["a.jpg"], "red")
    assert torch.allclose(similarity([[1.0, 0.0]], [[2.0, 0.0], [0.0, 3.0]]), torch.tensor([[1.0, 0.0]]))
    with pytest.raises(TypeError, match="embeddings"):
        similarity("a cat", "a dog")
    # encode_texts("a dog") returns one embedding [D]: it is one row, not "expected [Na, D]"
    assert torch.allclose(similarity(torch.tensor([1.0, 0.0]), [[2.0, 0.0], [0.0, 3.0]]), torch.tensor([[1.0, 0.0]]))
    with pytest.raises(ValueError, match=r"got \(1, 2\) and \(1, 3\)"):
        similarity(torch.ones(2), torch.ones(3))


def test_a_split_typo_lists_the_splits_the_dataset_has(tmp_path):
    from clipft.data.records import DataError, read_json
    ann = tmp_path / "annotations"
    ann.mkdir()
    for split in ("train", "val"):
        (ann / f"captions_{split}2014.json").write_text("{}")
    with pytest.raises(DataError, match=r"captions_tran2014.json: annotation file not found \(no split 'tran' "
                                        r"here; splits: train, val\)"):
        read_json(ann / "captions_tran2014.json")


def test_cuda_on_a_machine_without_a_gpu_driver_answers_before_torch(tmp_path, monkeypatch):
    import sys
    from clipft.cli import args as A
    from clipft.config import ConfigError
    real_nodes = A.GPU_NODES
    monkeypatch.setattr(A, "GPU_NODES", (str(tmp_path / "no-such-node"),))
    if sys.platform.startswith("linux"):
        with pytest.raises(ConfigError, match=r"device 'cuda:1': CUDA is not available .*--device cpu"):
            A.check_cuda_present("cuda:1")
        with pytest.raises(ConfigError, match="--set train.device=cpu"):
            A.check_cuda_present("cuda", "train.device")
    A.check_cuda_present("cpu")
    A.check_cuda_present("auto")
    monkeypatch.setattr(A, "GPU_NODES", (str(tmp_path),))  # a driver: torch decides later
    A.check_cuda_present("cuda")
    monkeypatch.undo()
    if not sys.platform.startswith("linux") or any(os.path.exists(p) for p in real_nodes):
        pytest.skip("this machine has a GPU driver: the CLI check below needs one without")
    import zipfile
    (tmp_path / "d").mkdir()
    with zipfile.ZipFile(tmp_path / "ck.pt", "w") as z:  # a zip, as every torch.save file is
        z.writestr("ck/data.pkl", b"")
    for argv in (["evaluate", "--checkpoint", "ck.pt", "--data", "d", "--device", "cuda"],
                 ["train", "--data", "d", "--out", "r", "--set", "train.device=cuda"]):
        r = imports_after(argv, tmp_path)
        assert r["rc"] == 2 and "CUDA is not available" in r["err"] and r["heavy"] == [], r


def test_an_unreadable_config_file_is_one_line(tmp_path, monkeypatch):
    from clipft.config import ConfigError, load_config
    f = tmp_path / "c.yaml"
    f.write_text("train: {epochs: 1}\n")
    real = Path.read_text

    def denied(self, *a, **k):  # chmod 000 does not stop root, who runs many containers
        if self == f:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *a, **k)
    monkeypatch.setattr(Path, "read_text", denied)
    with pytest.raises(ConfigError, match=r"c.yaml: cannot read the config file \(Permission denied\)"):
        load_config(f)
