"""`clipft report RUN`: the lab report of one run, complete, from one command.

RUN/report.md (the source of truth, readable on GitHub) is built from the run's files; what those
lack and the checkpoint + data can give (retrievals, heatmap, zero-shot, validation metrics,
random training pairs, curves) is drawn first (`complete`). Options add an ablation study, other
runs side by side and the user's notes; `--html` / `--pdf` render the same Markdown
(`report.html`: self-contained; `report.pdf`: headless Chromium's print of that HTML).

  sections.py  what is read from the run's own files (setup, Recall@K, zero-shot, logs, loss)
  complete.py  drawing what is missing from the checkpoint and the data
  extras.py    ablation, comparison, CLIP comparison figure, Reproduce, notes
  html.py      HTML and PDF
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from ..train.rundir import RunFiles, read_records
from .errors import ReportError
from .sections import (config_dump, health_lines, log_observations, loss_explanation, loss_spikes,
                       pictures_section, retrieval_section, setup_section, stability_notes, zero_shot_section)

__all__ = ["ReportError", "make_report", "write_report", "check_run_dir", "log_observations", "loss_explanation",
           "loss_spikes", "retrieval_section", "zero_shot_section", "health_lines", "stability_notes"]

_SECTION_TITLES = {"metrics": "Retrieval (Recall@K)", "text_to_image": "Qualitative retrievals: text -> image",
                   "image_to_text": "Qualitative retrievals: image -> text", "heatmap": "Similarity heatmap",
                   "zero_shot": "Zero-shot classification", "data_samples": "Setup: random training pairs"}


def _load_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError as e:
        raise ReportError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None


def check_run_dir(run_dir: str | Path) -> RunFiles:
    """RunFiles of a directory `clipft train --out` wrote, or ReportError saying what it is instead."""
    root = Path(run_dir)
    if not root.exists():
        raise ReportError(f"{root}: no such run directory")
    if not root.is_dir():
        raise ReportError(f"{root}: not a directory (give the run directory that `clipft train --out` wrote)")
    run = RunFiles(root)
    if not run.config.is_file() or not run.metrics.is_file():
        looks_like_data = (root / "annotations").is_dir() or any(root.glob("*2014")) or any(root.glob("*.csv"))
        what = "looks like a dataset, not a run directory" if looks_like_data else "not a run directory"
        raise ReportError(f"{root}: {what} (no config.json and metrics.jsonl; `clipft train --data DATA "
                          f"--out {root}` makes one)")
    return run


def _chosen_by(root: Path, summary: dict, cfg: dict) -> str:
    """Which checkpoint the tables and pictures measure, and which split chose it."""
    split = cfg.get("data", {}).get("val_split", "val")
    measured = Path(_load_json(root / f"metrics_{split}.json").get("checkpoint") or "best.pt").name
    best = summary.get("best_epoch")
    if measured == "last.pt":
        return f"Checkpoint measured: `last.pt`, the last epoch ({summary.get('epochs')})."
    if best is None or best < 0:
        return ""
    return (f"Checkpoint measured: `best.pt`, epoch {best} of {summary.get('epochs')}, chosen as the epoch with the "
            f"highest mean validation R@5 (both directions) on protocol `val` (the `{split}` images evaluated every "
            "epoch), so figures on `val` are optimistic by that choice. `val-heldout` (the validation images "
            "outside that subset) and `karpathy-test` played no part in training or selection; each picture "
            "below names the protocol it was drawn on.")


def _missing_block(missing: dict[str, str]) -> list[str]:
    if not missing:
        return []
    return ["## Missing sections", "", "These sections could not be drawn from this run directory; each line "
            "gives the command that fills it:", ""] + [f"- **{_SECTION_TITLES.get(k, k)}**: {v}."
                                                        for k, v in missing.items()] + [""]


def make_report(run_dir: str | Path, data: str | Path | None = None, notes: str | Path | None = None,
                ablation: str | Path | None = None, compare: Sequence[str | Path] = (), html: bool = False,
                pdf: bool = False, complete: bool = True, device: str = "auto", seed: int = 0,
                progress: bool = False) -> dict:
    """Write RUN/report.md (and report.html / report.pdf); returns {"md", "html", "pdf": paths or None,
    "drawn": files this call drew, "missing": section -> how to fill it}."""
    from . import complete as C
    from . import extras as X
    run = check_run_dir(run_dir)
    _check_inputs(notes, ablation, compare)
    done = C.complete_run(run.root, data=data, device=device, seed=seed, progress=progress) if complete \
        else C.Completion()
    cfg, summary = _load_json(run.config), _load_json(run.summary)
    epochs = read_records(run.metrics, "epoch")
    final = _load_json(run.root / "metrics.json") or summary.get("final_val") or {}
    provenance = C.read_provenance(run.root)
    t = cfg.get("train", {})
    lines = [f"# clipft run: `{run.root.name}`", "",
             "Built by `clipft report` from this run directory's files; everything up to \"Your notes\" is "
             "measured, and each picture says how its examples were chosen.", ""]
    lines += _missing_block(done.missing)
    lines += setup_section(run, cfg, summary, epochs)
    if (run.root / C.DATA_SAMPLES_PNG).is_file():
        rule = provenance.get(C.DATA_SAMPLES_PNG, {}).get("rule")
        lines += [f"![random image-caption pairs]({C.DATA_SAMPLES_PNG})", "",
                  "Random training image-caption pairs (integrity check)" + (f": {rule}." if rule else "."), ""]
    elif "data_samples" in done.missing:
        lines += [f"*Missing:* {done.missing['data_samples']}.", ""]
    figures = X.clip_comparison_figures(run.root, _metrics_with_zero_shot(run.root))
    lines += retrieval_section(run.root, final, _chosen_by(run.root, summary, cfg), figures, done.missing.get("metrics"))
    lines += zero_shot_section(run.root, done.missing.get("zero_shot"), provenance)
    lines += pictures_section(run.root, provenance, done.missing)
    lines += ["## Training curves", "", f"![training curves]({run.curves.name})" if run.curves.is_file() else
              f"*Missing:* no completed epoch in metrics.jsonl yet; `clipft visualize curves --run {run.root}` draws "
              "the curves once there is one.", ""]
    if compare:
        lines += X.compare_section(run.root, list(compare))
    if ablation:
        lines += X.ablation_section(run.root, ablation)
    lines += ["## Training stability", ""] + [f"- {n}" for n in stability_notes(epochs, t.get("batch_size", 1))]
    lines += [f"- {n}" for n in log_observations(read_records(run.metrics, "step"), epochs, t.get("log_every"))]
    lines += ["", "## Health warnings", ""] + health_lines(read_records(run.metrics, "warning"))
    lines += [""] + loss_explanation(cfg, epochs[-1].get("logit_scale") if epochs else None)
    lines += X.reproduce_section(run.root) + config_dump(cfg) + X.notes_section(notes)
    out = run.root / "report.md"
    out.write_text("\n".join(lines))
    result = {"md": out, "html": None, "pdf": None, "drawn": done.drawn, "missing": done.missing}
    if html or pdf:
        from .html import write_html, write_pdf
        result["html"] = write_html(out)
        result["pdf"] = write_pdf(result["html"]) if pdf else None
    return result


def _check_inputs(notes: str | Path | None, ablation: str | Path | None, compare: Sequence[str | Path]) -> None:
    """Refuse a bad option before any drawing starts."""
    if notes is not None and not Path(notes).is_file():
        raise ReportError(f"{notes}: notes file not found")
    if ablation is not None and not (Path(ablation) / "ablation.json").is_file():
        raise ReportError(f"{Path(ablation) / 'ablation.json'}: not found (is {ablation} a `clipft ablate --out` "
                          "directory?)")
    for other in compare:
        check_run_dir(other)


def _metrics_with_zero_shot(root: Path) -> list[tuple[str, dict]]:
    from .sections import _metrics_files
    return [(s, m) for s, m in _metrics_files(root) if "zero_shot" in m]


def write_report(run_dir: str | Path, **options) -> Path:
    """Write RUN/report.md (see `make_report` for the options); returns its path."""
    return make_report(run_dir, **options)["md"]
