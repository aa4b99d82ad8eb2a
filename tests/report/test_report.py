"""The report is built from the run's files only; `clipft demo` produces the full report; zero-shot
accuracy after a short demo-style training is well above chance."""

from __future__ import annotations

import json
import re
import shutil

import pytest

from clipft.cli.commands import main
from clipft.report import (log_observations, loss_explanation, loss_spikes, retrieval_section, write_report,
                           zero_shot_section)


def test_loss_spikes_and_overfitting_are_found_in_the_logs():
    steps = [{"step": i, "loss": v, "grad_norm": 1.0} for i, v in
             enumerate([4.0, 3.8, 3.6, 3.5, 3.4, 6.0, 3.2, 3.1, float("nan")])]
    spikes = loss_spikes(steps)
    assert [s["step"] for s in spikes] == [5, 8]
    assert spikes[0]["median"] == pytest.approx(3.6)
    epochs = [{"epoch": e, "train_loss": t, "val_loss": v, "mean_R@5": r}
              for e, t, v, r in [(1, 3.0, 3.2, 10.0), (2, 2.0, 2.5, 30.0), (3, 1.0, 2.9, 25.0)]]
    notes = " ".join(log_observations(steps, epochs, log_every=10))
    assert "2 loss spike(s) among 9 logged steps, one record every 10 steps" in notes
    assert "Over-fitting sign: val loss rose +0.400 after epoch 2" in notes
    assert "-5.00 points from its best (epoch 2)" in notes
    calm = [{"epoch": e, "train_loss": 3.0 - e, "val_loss": 3.5 - e} for e in (1, 2)]
    assert "No over-fitting sign" in " ".join(log_observations([], calm))


def test_loss_explanation_uses_the_run_values():
    text = "\n".join(loss_explanation({"train": {"batch_size": 32}, "model": {"temperature": 0.05}}))
    for needle in ("Anchors", "Positive", "other 31 captions", "tau = 0.05", "1/tau = 20.0", "ln(32) = 3.47"):
        assert needle in text


def test_every_protocol_gets_its_own_table(tmp_path):
    def m(split, proto, r):
        return {"split": split, "protocol": proto, "num_images": 1, "num_captions": 5,
                "image_to_text": {"R@1": r, "R@5": r}, "text_to_image": {"R@1": r, "R@5": r}}
    (tmp_path / "metrics_karpathy-test.json").write_text(json.dumps(m("karpathy-test", "PROTO-K", 12.5)))
    both = m("val", "PROTO-V", 50.0)
    both["zero_shot"] = {"model": "openai/clip", **m("val", "", 40.0)}
    (tmp_path / "metrics_val.json").write_text(json.dumps(both))
    text = "\n".join(retrieval_section(tmp_path, {}))
    assert text.index("### `val`") < text.index("### `karpathy-test`")  # training protocol first
    assert "Protocol: PROTO-V." in text and "Protocol: PROTO-K." in text and "| 12.50 |" in text
    assert "zero-shot `openai/clip`" in text and "| 50.00 | 40.00 | +10.00 |" in text
    assert zero_shot_section(tmp_path) == []


DEMO_ARGS = ["--train-images", "64", "--val-images", "16", "--set", "train.epochs=6", "--set", "train.batch_size=16",
             "--set", "train.lr=2e-3", "--set", "train.warmup_steps=2", "--set", "data.image_size=24",
             "--set", "model.head_hidden=64", "--set", "train.log_every=2", "--quiet"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """`clipft demo` at a small size (64 train / 16 val images, 6 epochs at 24 px; offline MiniLM text)."""
    pytest.importorskip("sentence_transformers")
    out = tmp_path_factory.mktemp("demo") / "run"
    assert main(["demo", "--out", str(out), *DEMO_ARGS]) == 0
    return out


def test_demo_writes_the_full_report(demo_run):
    report = (demo_run / "report.md").read_text()
    cfg = json.loads((demo_run / "config.json").read_text())
    # The demo reports on the validation images that did not choose best.pt (protocol val-heldout).
    metrics = json.loads((demo_run / "metrics_val-heldout.json").read_text())
    zs = json.loads((demo_run / "zeroshot_val-heldout.json").read_text())
    summary = json.loads((demo_run / "summary.json").read_text())
    # Hyperparameters, hardware and time, data sizes: the run's values.
    for needle in ("resnet18", "all-MiniLM-L6-v2", "lr 0.002", "6 x 16", "24 px", "AdamW", "temperature",
                   summary["hardware"]["cpu"], "training time", "64 train images", "16 val images"):
        assert needle in report, needle
    # The precision the run chose (train.amp=auto), and why.
    assert summary["precision"]["reason"].startswith("auto: ")
    assert f"| precision | {summary['precision']['dtype']}" in report and summary["precision"]["reason"] in report
    # Recall@K with its protocol, the zero-shot table, stability notes and the loss explanation.
    assert f"Protocol: {metrics['protocol']}." in report
    assert f"| image -> text | {metrics['image_to_text']['R@1']:.2f} |" in report
    assert f"| top-1 | {zs['top1']:.2f} | {zs['chance_top1']:.2f} |" in report
    for needle in ("## Training stability", "loss spike", "Best epoch", "gap", "## How it works", "Negatives",
                   "## Qualitative retrievals", "## Zero-shot classification", "Full resolved configuration"):
        assert needle in report, needle
    # Every picture the report links exists in the run directory, and all the pictures are linked.
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    assert all((demo_run / link).is_file() for link in links)
    assert set(links) >= {"loss_curves.png", "data_samples.png", "retrieval_text_to_image.png",
                          "retrieval_image_to_text.png", "similarity_heatmap.png",
                          "zeroshot_val-heldout_examples.png", "zeroshot_val-heldout_confusion.png"}
    # Nothing hand-written or missing.
    for bad in ("TODO", "placeholder", "None", "nan", "XX"):
        assert bad not in report, bad
    # Rebuilt from the files alone (a copy elsewhere), the report is identical. (Rebuilt here first:
    # RUN/commands.txt got the demo's own line once the demo had written its report.)
    report = write_report(demo_run).read_text()
    assert "clipft demo --out" in report.split("## Reproduce", 1)[1]
    copy = demo_run.parent / "copy"
    shutil.copytree(demo_run, copy, ignore=shutil.ignore_patterns("data", "*.pt"))
    assert (copy / "report.md").unlink() is None and write_report(copy).read_text().replace("copy", "run") == report


def test_zero_shot_after_demo_style_training_is_well_above_chance(demo_run, capsys):
    """The demo's own figure (val, 40 colour+shape classes) is in docs/measurements.md; here, robustly at test size:
    the colour of the largest object on the 64 training images (8 classes, chance 12.5%)."""
    out = demo_run / "zs_train"
    assert main(["zeroshot", "--checkpoint", str(demo_run / "best.pt"), "--data", str(demo_run / "data"),
                 "--split", "train", "--labels-from", "shapes:color", "--out", str(out), "--quiet"]) == 0
    r = json.loads((out / "zeroshot_train.json").read_text())
    assert r["num_images"] >= 30
    assert r["top1"] >= 2 * r["chance_top1"], r["top1"]
    print(capsys.readouterr().out)


def test_learned_temperature_reports_its_final_value():
    cfg = {"train": {"batch_size": 8}, "model": {"temperature": 0.07, "learnable_temperature": True,
                                                 "max_logit_scale": 100.0}}
    text = "\n".join(loss_explanation(cfg, final_logit_scale=25.0))
    assert "learned from this initial value" in text and "ended at 1/tau = 25.0, tau = 0.0400" in text


# --------------------------------------------------------------------------- the report completes itself

TRAINING_FILES = ("config.json", "metrics.jsonl", "summary.json", "epochs.csv", "loss_curves.png", "best.pt",
                  "commands.txt")


def copy_training_files(run, dest):
    """A run directory as `clipft train` alone leaves it (no picture, no evaluation, no report)."""
    dest.mkdir(parents=True)
    for name in TRAINING_FILES:
        if (run / name).is_file():
            shutil.copy(run / name, dest / name)
    return dest


def image_links(markdown):
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)


@pytest.fixture(scope="module")
def fresh_report(trained_run, tmp_path_factory):
    """`clipft report RUN --notes NOTES.md --pdf` on a run that only `clipft train` made."""
    run = copy_training_files(trained_run, tmp_path_factory.mktemp("fresh") / "run")
    notes = run.parent / "notes.md"
    notes.write_text("My observations.\n\n## LLM usage\n\n- prompt *one* | with a pipe\n\nhttps://example.org/chat/1\n")
    args = ["report", str(run), "--notes", str(notes), "--quiet"]
    from clipft.report.html import find_chromium
    pdf = find_chromium() is not None
    assert main(args + (["--pdf"] if pdf else ["--html"])) == 0
    return run, notes, pdf


def test_train_then_report_gives_every_section(fresh_report):
    run, _, _ = fresh_report
    report = (run / "report.md").read_text()
    for section in ("## Setup", "## Retrieval (Recall@K, %)", "## Zero-shot classification", "## Qualitative retrievals",
                    "## Training curves", "## Training stability", "## Health warnings", "## How it works",
                    "## Reproduce", "Full resolved configuration", "## Your notes"):
        assert section in report, section
    assert "Missing" not in report
    links = image_links(report)
    assert set(links) == {"data_samples.png", "retrieval_text_to_image.png", "retrieval_image_to_text.png",
                          "similarity_heatmap.png", "zeroshot_val_examples.png", "zeroshot_val_confusion.png",
                          "loss_curves.png"}
    assert all((run / link).is_file() for link in links)
    # The Recall@K table measures best.pt, and says which split chose it.
    rules = json.loads((run / "report_pictures.json").read_text())
    m = json.loads((run / "metrics_val.json").read_text())
    assert m["checkpoint"].endswith("best.pt")
    assert f"| image -> text | {m['image_to_text']['R@1']:.2f} |" in report
    assert "chosen as the epoch with the highest mean validation R@5 (both directions) on protocol `val`" in report
    assert "on the `val` split" in rules["retrieval_text_to_image.png"]["from"]  # no held-out images here
    # Examples are chosen by a stated rule, recorded beside the pictures.
    assert "best and the worst remaining query by the rank" in rules["retrieval_text_to_image.png"]["rule"]
    assert rules["retrieval_text_to_image.png"]["rule"] in report
    # Reproduce lists how the run was made.
    assert "clipft train --data" in report.split("## Reproduce")[1]
    assert "clipft report" in (run / "commands.txt").read_text().splitlines()[-1]


def test_a_second_report_reuses_newer_pictures(fresh_report):
    run, notes, _ = fresh_report
    before = {p.name: p.stat().st_mtime_ns for p in run.glob("*.png")}
    from clipft.report import make_report
    r = make_report(run, notes=notes)
    assert r["drawn"] == [] and r["missing"] == {}
    assert {p.name: p.stat().st_mtime_ns for p in run.glob("*.png")} == before


def test_notes_are_included_verbatim(fresh_report):
    run, notes, _ = fresh_report
    report = (run / "report.md").read_text()
    assert notes.read_text().rstrip("\n") in report
    assert "(your answer)" not in report


def test_without_notes_the_lab_questions_are_the_last_section(trained_run, tmp_path):
    from clipft.report import write_report
    run = copy_training_files(trained_run, tmp_path / "run")
    text = write_report(run, complete=False).read_text()
    notes = text.split("## Your notes", 1)[1]
    assert "## " not in notes.replace("### ", "").replace("#### ", "")  # nothing after it
    for q in ("Which prompts were most useful?", "How were outputs validated?", "A link to the conversation"):
        assert q in notes


def test_a_run_whose_data_moved_says_what_is_missing_and_how_to_fill_it(trained_run, coco_root, tmp_path, capsys):
    run = copy_training_files(trained_run, tmp_path / "run")
    summary = json.loads((run / "summary.json").read_text())
    summary["data_root"] = str(tmp_path / "moved-away")
    (run / "summary.json").write_text(json.dumps(summary))
    assert main(["report", str(run), "--quiet"]) == 0
    out = capsys.readouterr().out
    report = (run / "report.md").read_text()
    block = report.split("## Missing sections", 1)[1].split("\n## ", 1)[0]
    for needle in (f"clipft visualize text-to-image --checkpoint {run}/best.pt --data DATA",
                   f"clipft visualize heatmap --checkpoint {run}/best.pt --data DATA",
                   f"clipft zeroshot --checkpoint {run}/best.pt --data DATA", f"clipft evaluate --checkpoint",
                   f"clipft report {run} --data DATA", str(tmp_path / "moved-away")):
        assert needle in block, needle
    assert report.count("*Missing:*") >= 4  # in place too: zero-shot and the three retrieval pictures
    assert "missing text_to_image" in out
    # Pointing at the data fills every section.
    assert main(["report", str(run), "--data", str(coco_root), "--quiet"]) == 0
    assert "Missing" not in (run / "report.md").read_text()


@pytest.mark.parametrize("what", ["nope", "data"])
def test_report_on_something_else_than_a_run_is_one_error_line(what, coco_root, tmp_path, capsys):
    target = tmp_path / "nope" if what == "nope" else coco_root
    assert main(["report", str(target)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"clipft: error: {target}: ")
    assert ("no such run directory" if what == "nope" else "looks like a dataset") in err[0]
    assert not (target / "report.md").exists() and not (target / "commands.txt").exists()


# --------------------------------------------------------------------------- ablation and comparison

def fake_run(trained_run, dest, shift, **data):
    """A copy of trained_run's logs whose validation recalls are shifted by `shift` points (and whose
    data config gets `data` values): a run with known numbers, without training one."""
    copy_training_files(trained_run, dest)
    (dest / "best.pt").unlink()
    recs = [json.loads(line) for line in (dest / "metrics.jsonl").read_text().splitlines()]
    for r in recs:
        for d in ("image_to_text", "text_to_image"):
            for k in r.get("val", {}).get(d, {}):
                r["val"][d][k] = round(r["val"][d][k] + shift, 4)
    (dest / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    cfg = json.loads((dest / "config.json").read_text())
    cfg["data"].update(data)
    (dest / "config.json").write_text(json.dumps(cfg))
    return dest


def final_val(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
            if '"type": "epoch"' in line][-1]["val"]


def test_compare_table_agrees_with_each_runs_metrics_and_checks_the_protocol(trained_run, tmp_path):
    from clipft.report import write_report
    run = copy_training_files(trained_run, tmp_path / "run")
    other = fake_run(trained_run, tmp_path / "other", 3.25)
    text = write_report(run, compare=[other], complete=False).read_text()
    section = text.split("## Comparison with other runs", 1)[1].split("\n## ", 1)[0]
    assert "Same protocol checked" in section
    for r in (run, other):
        m = final_val(r)
        row = f"| `{r.name}` | " + " | ".join(f"{m[d][k]:.2f}" for d in ("image_to_text", "text_to_image")
                                                for k in m[d])
        assert row in section, row
    assert (run / "compare_recall.png").is_file() and (run / "compare_curves.png").is_file()
    odd = fake_run(trained_run, tmp_path / "odd", 0.0, val_images=7)
    text = write_report(run, compare=[odd], complete=False).read_text()
    assert "**Not the same protocol**: the runs differ in val subset" in text


def test_ablation_table_agrees_with_the_per_run_metrics(trained_run, tmp_path):
    from clipft.report import write_report
    study = tmp_path / "study"
    runs = {("baseline", 0): 0.0, ("baseline", 1): 1.0, ("wider", 0): 2.5, ("wider", 1): 4.5}
    for (name, seed), shift in runs.items():
        fake_run(trained_run, study / "runs" / name / f"seed_{seed}", shift)
    (study / "ablation.json").write_text(json.dumps({
        "seeds": [0, 1], "metric_names": [f"{d}_R@{k}" for d in ("image_to_text", "text_to_image") for k in (1, 5, 10)]
        + ["mean_recall"],
        "configs": {"baseline": {"overrides": {}, "about": "reference"},
                    "wider": {"overrides": {"model": {"head_hidden": 64}}, "about": "wider head"}},
        "runs": [{"config": n, "seed": s} for n, s in runs]}))
    run = copy_training_files(trained_run, tmp_path / "run")
    text = write_report(run, ablation=study, complete=False).read_text()
    section = text.split("## Ablation study", 1)[1].split("\n## ", 1)[0]
    import statistics
    for name in ("baseline", "wider"):
        vals = [final_val(study / "runs" / name / f"seed_{s}")["image_to_text"]["R@1"] for s in (0, 1)]
        cell = f"{statistics.mean(vals):.2f} ± {statistics.stdev(vals):.2f}"
        assert f"| `{name}` | " in section and cell in section.split(f"| `{name}` |")[1].splitlines()[0], cell
    # wider - baseline, paired by seed: (2.5 - 0) and (4.5 - 1) -> 3.00 ± 0.71
    assert "+3.00 ± 0.71" in section and "seeds (0 1)" in section
    assert (run / "ablation_recall.png").is_file() and "ablation_recall.png" in section


# --------------------------------------------------------------------------- HTML and PDF

def test_html_is_self_contained(fresh_report):
    run, _, _ = fresh_report
    page = (run / "report.html").read_text()
    srcs = re.findall(r'\b(?:src|href)\s*=\s*"([^"]*)"', page)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in re.findall(r'<img src="([^"]*)"', page))
    assert all(s.startswith(("data:", "https://example.org")) for s in srcs), srcs  # the notes' own link
    assert "<link" not in page and "@import" not in page and "url(" not in page
    assert page.count("<img ") == len(image_links((run / "report.md").read_text()))
    assert "<details open>" in page  # the folded config is printed


def test_pdf_has_every_figure_on_a_page_and_no_blank_page(fresh_report, tmp_path):
    import subprocess

    import numpy as np
    from PIL import Image
    run, _, pdf = fresh_report
    if not pdf or shutil.which("pdftoppm") is None or shutil.which("pdfimages") is None:
        pytest.skip("needs chromium and poppler-utils (pdftoppm, pdfimages): apt-get install chromium poppler-utils")
    n_figures = len(image_links((run / "report.md").read_text()))
    listing = subprocess.run(["pdfimages", "-list", str(run / "report.pdf")], capture_output=True, text=True,
                             check=True).stdout.splitlines()[2:]
    images = [line.split() for line in listing if line.split()[2] == "image"]
    assert len(images) == n_figures  # each picture once: none lost, none split over two pages
    subprocess.run(["pdftoppm", "-r", "30", "-png", str(run / "report.pdf"), str(tmp_path / "page")], check=True)
    pages = sorted(tmp_path.glob("page-*.png"))
    assert len(pages) >= 2 and {int(i[0]) for i in images} <= set(range(1, len(pages) + 1))
    for page in pages:
        ink = (np.asarray(Image.open(page).convert("L")) < 200).mean()
        assert ink > 0.002, f"{page.name} is blank"


def test_zero_shot_clip_comparison_gets_its_figure(trained_run, tmp_path):
    from clipft.report import write_report
    run = copy_training_files(trained_run, tmp_path / "run")
    m = {"split": "val", "protocol": "P", "checkpoint": str(run / "best.pt"),
         "image_to_text": {"R@1": 20.0, "R@5": 50.0}, "text_to_image": {"R@1": 22.0, "R@5": 55.0}}
    m["zero_shot"] = {"model": "tiny-clip", "image_to_text": {"R@1": 30.0, "R@5": 60.0},
                      "text_to_image": {"R@1": 31.0, "R@5": 61.0}}
    (run / "metrics_val.json").write_text(json.dumps(m))
    text = write_report(run, complete=False).read_text()
    assert "| image -> text | 1 | 20.00 | 30.00 | -10.00 |" in text
    assert "![fine-tuned vs zero-shot CLIP on val](clip_comparison_val.png)" in text
    assert (run / "clip_comparison_val.png").is_file()


def test_with_a_validation_subset_the_pictures_are_drawn_on_held_out_images(coco_root, tiny_clip_dir, tmp_path):
    """best.pt chosen on 6 of the 12 val images: the report measures and draws on the other 6."""
    run = tmp_path / "run"
    args = ["--set", f"text.encoder={tiny_clip_dir}", "--set", "train.epochs=1", "--set", "train.batch_size=8",
            "--set", "train.max_steps_per_epoch=1", "--set", "model.backbone=resnet18", "--set",
            "model.image_weights=none", "--set", "model.head_hidden=32", "--set", "data.image_size=32", "--set",
            "data.num_workers=0", "--set", "train.device=cpu", "--set", "data.val_images=6", "--quiet"]
    assert main(["train", "--data", str(coco_root), "--out", str(run), *args]) == 0
    assert main(["report", str(run), "--quiet"]) == 0
    m = json.loads((run / "metrics_val-heldout.json").read_text())
    assert m["num_images"] == 6 and (run / "zeroshot_val-heldout.json").is_file()
    rules = json.loads((run / "report_pictures.json").read_text())
    assert "on the `val-heldout` split" in rules["retrieval_image_to_text.png"]["from"]
    report = (run / "report.md").read_text()
    assert "### `val-heldout`" in report and "Missing" not in report
