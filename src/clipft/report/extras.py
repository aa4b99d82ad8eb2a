"""Report sections beyond the run itself: an ablation study, other runs side by side, the zero-shot
CLIP comparison figure, how the run was made (RUN/commands.txt), and the student's own notes."""

from __future__ import annotations

import json
from pathlib import Path

from ..eval.evaluate import DIRECTIONS
from ..train.rundir import RunFiles, read_records
from .errors import ReportError

ABLATION_RECALL_PNG = "ablation_recall.png"
ABLATION_CURVES_PNG = "ablation_curves.png"
COMPARE_RECALL_PNG = "compare_recall.png"
COMPARE_CURVES_PNG = "compare_curves.png"


def _pm(mean: float | None, std: float | None, signed: bool = False) -> str:
    if mean is None:
        return "-"
    return (f"{mean:+.2f}" if signed else f"{mean:.2f}") + (f" ± {std:.2f}" if std is not None else "")


def ablation_study(study_dir: str | Path) -> dict:
    """DIR/ablation.json with its per-run results and rows recomputed from each run's own files
    (metrics.jsonl, summary.json), so the report's table is what the runs measured."""
    from ..cli.ablate import StudyRun, run_result, summarise
    study_dir = Path(study_dir)
    path = study_dir / "ablation.json"
    if not path.is_file():
        raise ReportError(f"{path}: not found (is {study_dir} a `clipft ablate --out` directory?)")
    study = json.loads(path.read_text())
    # Runs live in DIR/runs/<configuration>/seed_<S> (found there also when the study was moved).
    runs = [StudyRun(r["config"], int(r["seed"]), study_dir / "runs" / r["config"] / f"seed_{r['seed']}", None)
            for r in study["runs"]]
    results = [run_result(r) for r in runs]
    study["runs"] = results
    study["rows"] = summarise(results, {n: c["overrides"] for n, c in study["configs"].items()})
    return study


def ablation_section(root: Path, study_dir: str | Path) -> list[str]:
    """The study's table (mean ± sample std over seeds, change against the baseline paired by seed)
    and its two charts, redrawn into RUN from the per-run files."""
    from ..cli.ablate import describe, plot_recall_curves, plot_recall_deltas
    study = ablation_study(study_dir)
    ms = [m for m in study["metric_names"] if m != "mean_recall"]
    seeds = " ".join(str(s) for s in study["seeds"])
    lines = ["## Ablation study", "",
             f"From `{study_dir}` (`clipft ablate`): every configuration trained with the same data, budget and "
             f"seeds ({seeds}); validation Recall@K (%) after the final epoch, read from each run's metrics.jsonl. "
             + ("Cells are mean ± sample standard deviation over the seeds; the change against the baseline is "
                "paired by seed." if len(study["seeds"]) > 1 else
                "One seed per configuration: a difference of a point or two can be seed noise."), ""]
    head = ["configuration", "changes", "seeds"] + [m.replace("image_to_text_", "i2t ").replace("text_to_image_", "t2i ")
                                                     for m in ms] + ["mean R", "Δ mean R"]
    lines += ["| " + " | ".join(head) + " |", "|---|---|---|" + "---:|" * (len(head) - 3)]
    for row in study["rows"]:
        delta = "(reference)" if row["config"] == "baseline" else _pm(row.get("delta_mean_recall"),
                                                                      row.get("delta_mean_recall_std"), signed=True)
        cells = [f"`{row['config']}`" + ("" if row["status"] == "ok" else f" ({row['status']})"),
                 f"`{describe(study['configs'][row['config']]['overrides'])}`", row["seeds"]]
        cells += [_pm(row.get(m), row.get(f"{m}_std")) for m in ms + ["mean_recall"]] + [delta]
        lines.append("| " + " | ".join(cells) + " |")
    plot_recall_deltas(root / ABLATION_RECALL_PNG, study)
    plot_recall_curves(root / ABLATION_CURVES_PNG, study)
    return lines + ["", f"![Recall@K change against the baseline]({ABLATION_RECALL_PNG})", "",
                    f"![validation Recall@5 per epoch, every configuration]({ABLATION_CURVES_PNG})", ""]


def _final_val(run: RunFiles) -> tuple[dict, list[dict]]:
    epochs = read_records(run.metrics, "epoch")
    with_val = [r for r in epochs if "val" in r]
    if not with_val:
        raise ReportError(f"{run.metrics}: no validation record (is {run.root} a finished run?)")
    return with_val[-1]["val"], epochs


def protocol_of(run: RunFiles) -> dict:
    """What makes two runs' validation numbers comparable: the same images and captions, scored
    the same way (dataset, subset, sizes, text encoder, Ks)."""
    cfg = json.loads(run.config.read_text()) if run.config.is_file() else {}
    summary = json.loads(run.summary.read_text()) if run.summary.is_file() else {}
    val, _ = _final_val(run)
    d = cfg.get("data", {})
    return {"val data": summary.get("dataset", {}).get("val_source"), "val split": d.get("val_split"),
            "val subset": f"{d.get('val_images')} images, seed {d.get('subset_seed')}",
            "images x captions": f"{val.get('num_images')} x {val.get('num_captions')}",
            "text encoder": cfg.get("text", {}).get("encoder"), "Ks": ", ".join(val["image_to_text"])}


def compare_section(root: Path, others: list[str | Path]) -> list[str]:
    """Final-epoch validation Recall@K of this run and others side by side, their curves, and a check
    that all were measured under the same protocol."""
    from ..eval.plots import plot_recall_comparison, plot_run_curves
    runs = [RunFiles(root)] + [RunFiles(Path(o)) for o in others]
    for r in runs[1:]:
        if not r.metrics.is_file():
            raise ReportError(f"{r.root}: not a run directory (no metrics.jsonl)")
    names = [r.root.name if r.root.name not in [x.root.name for x in runs[:i]] else str(r.root)
             for i, r in enumerate(runs)]
    finals, curves = {}, {}
    for name, r in zip(names, runs):
        finals[name], curves[name] = _final_val(r)
    protos = [protocol_of(r) for r in runs]
    differ = [k for k in protos[0] if any(p[k] != protos[0][k] for p in protos[1:])]
    ks = list(finals[names[0]]["image_to_text"])
    lines = ["## Comparison with other runs", "",
             "Validation Recall@K (%) after each run's final epoch, from its metrics.jsonl.", ""]
    if differ:
        lines += ["**Not the same protocol**: the runs differ in " + "; ".join(
            f"{k} ({', '.join(f'{n}: {p[k]}' for n, p in zip(names, protos))})" for k in differ)
            + ". Their numbers are not comparable.", ""]
    else:
        p = protos[0]
        lines += [f"Same protocol checked: {p['val data']} ({p['val subset']}; {p['images x captions']}), text "
                  f"encoder `{p['text encoder']}`, K = {p['Ks']}.", ""]
    head = ["run"] + [f"{'i2t' if d == 'image_to_text' else 't2i'} {k}" for d in DIRECTIONS for k in ks] + ["epochs"]
    lines += ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for name in names:
        m = finals[name]
        lines.append(f"| `{name}` | " + " | ".join(f"{m[d][k]:.2f}" for d in DIRECTIONS for k in ks)
                     + f" | {curves[name][-1]['epoch']} |")
    plot_recall_comparison(finals, root / COMPARE_RECALL_PNG, "Validation Recall@K, final epoch of each run")
    plot_run_curves(curves, root / COMPARE_CURVES_PNG)
    return lines + ["", f"![Recall@K of the runs side by side]({COMPARE_RECALL_PNG})", "",
                    f"![train loss and validation R@5 per epoch of each run]({COMPARE_CURVES_PNG})", ""]


def clip_comparison_figures(root: Path, files: list[tuple[str, dict]]) -> dict[str, str]:
    """split -> PNG name of a fine-tuned vs zero-shot CLIP bar chart, for every metrics file written by
    `clipft evaluate --compare-zero-shot` (redrawn when older than its metrics file)."""
    from ..eval.plots import plot_recall_comparison
    out = {}
    for split, m in files:
        if "zero_shot" not in m:
            continue
        png, src = root / f"clip_comparison_{split}.png", root / f"metrics_{split}.json"
        if not png.is_file() or (src.is_file() and png.stat().st_mtime < src.stat().st_mtime):
            plot_recall_comparison({"fine-tuned": m, f"zero-shot {m['zero_shot']['model']}": m["zero_shot"]}, png,
                                   f"Recall@K on `{split}`: fine-tuned vs zero-shot CLIP")
        out[split] = png.name
    return out


def reproduce_section(root: Path) -> list[str]:
    """RUN/commands.txt: every clipft command run against this run, in order."""
    from ..train.commandlog import COMMANDS_TXT, read_commands
    from .complete import data_hint
    lines = ["## Reproduce", ""]
    cmds = read_commands(root)
    if not cmds:
        return lines + [f"No `{COMMANDS_TXT}` in this run (it was made before clipft recorded its commands). "
                        f"Rerunning `clipft train --data {data_hint(root)} --out {root}` continues it from its "
                        "saved config.json.", ""]
    return lines + [f"Every clipft command run against this run directory, from `{COMMANDS_TXT}` (date, clipft "
                    "version, command line):", "", "```text", *cmds, "```", ""]


# The lab's questions: (heading level, heading, what the answer looks like).
NOTES_HEADINGS = (("###", "Observations", "*(your observations on the results above)*"),
                  ("###", "How LLM tools were used", "*(which tools, for which parts of the work)*"),
                  ("####", "Which prompts were most useful?", "*(your answer)*"),
                  ("####", "How were outputs validated?", "*(your answer)*"),
                  ("####", "A link to the conversation", "*(your link)*"))


def notes_section(notes: str | Path | None) -> list[str]:
    """The user's own Markdown file, verbatim; without one, the lab's questions as empty headings:
    the one section of the report that is meant to be written by hand."""
    if notes is not None:
        path = Path(notes)
        if not path.is_file():
            raise ReportError(f"{path}: notes file not found")
        return ["## Your notes", "", path.read_text().rstrip("\n"), ""]
    lines = ["## Your notes", "",
             "> **To be written by you.** Everything above is derived from the run's files; this section is "
             "left empty on purpose. Write it in a Markdown file and rebuild with `--notes FILE.md`.", ""]
    for level, heading, answer in NOTES_HEADINGS:
        lines += [f"{level} {heading}", "", answer, ""]
    return lines
