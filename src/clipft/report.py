"""A Markdown report of one run, built only from the files in the run directory."""

from __future__ import annotations

import json
from pathlib import Path

from .evaluate import DIRECTIONS
from .loss import chance_loss
from .train import RunFiles, read_records


def _load_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _recall_table(metrics: dict) -> list[str]:
    ks = list(metrics["image_to_text"].keys())
    lines = ["| direction | " + " | ".join(ks) + " |", "|---|" + "---:|" * len(ks)]
    for d in DIRECTIONS:
        lines.append(f"| {d.replace('_to_', ' -> ')} | " + " | ".join(f"{metrics[d][k]:.2f}" for k in ks) + " |")
    return lines


def _fmt_seconds(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h {s % 3600 // 60:02d}m {s % 60:02d}s" if s >= 3600 else f"{s // 60}m {s % 60:02d}s"


def stability_notes(epochs: list[dict], batch_size: int) -> list[str]:
    """Plain-words observations computed from the epoch records."""
    notes = []
    if not epochs:
        return ["No completed epoch was logged."]
    skipped = sum(r.get("skipped_steps", 0) for r in epochs)
    notes.append(f"{skipped} optimisation step(s) skipped for non-finite loss or gradients." if skipped
                 else "No step was skipped for a non-finite loss.")
    bad_img = sum(r.get("skipped_images", 0) for r in epochs)
    if bad_img:
        notes.append(f"{bad_img} unreadable training image(s) were skipped (summed over epochs).")
    chance = chance_loss(batch_size)
    last = epochs[-1]["train_loss"]
    notes.append(f"Final train loss {last:.3f} against chance level ln({batch_size}) = {chance:.3f}"
                 + (" - the model learned." if last < 0.9 * chance else " - barely below chance: check the run."))
    with_val = [r for r in epochs if r.get("val_loss") is not None]
    if with_val:
        best = max(with_val, key=lambda r: r.get("mean_R@5", -1))
        notes.append(f"Best epoch by mean validation R@5: {best['epoch']} ({best['mean_R@5']:.2f}%).")
        gap = with_val[-1]["val_loss"] - with_val[-1]["train_loss"]
        notes.append(f"Generalisation gap at the last epoch (val loss - train loss): {gap:+.3f}.")
    return notes


def health_lines(warnings: list[dict]) -> list[str]:
    """Markdown bullets for the "warning" records of metrics.jsonl (see clipft.health)."""
    if not warnings:
        return ["- None raised. Checked during training: loss within 2% of chance after warmup, embedding "
                "collapse (mean pairwise cosine > 0.95), logit scale pinned at its clamp, validation recall "
                "falling while train loss falls."]
    return [f"- **{w.get('kind')}** (epoch {w.get('epoch')}, step {w.get('step')}): {w.get('message')}"
            for w in warnings]


def write_report(run_dir: str | Path) -> Path:
    """Write RUN/report.md: hyperparameters, hardware and time, data sizes, Recall@K, curves."""
    run = RunFiles(Path(run_dir))
    cfg = _load_json(run.config)
    summary = _load_json(run.summary)
    epochs = read_records(run.metrics, "epoch")
    final = _load_json(run.root / "metrics.json") or summary.get("final_val") or {}
    t, m, d, x = cfg.get("train", {}), cfg.get("model", {}), cfg.get("data", {}), cfg.get("text", {})

    lines = [f"# clipft run: `{run.root.name}`", ""]
    lines += ["## Setup", "", "| setting | value |", "|---|---|"]
    rows = [
        ("image backbone", f"{m.get('backbone')} (init: {m.get('image_weights')}), head hidden {m.get('head_hidden')}"),
        ("text encoder (frozen)", f"`{x.get('encoder')}`"),
        ("temperature", f"{m.get('temperature')} ({'learnable' if m.get('learnable_temperature') else 'fixed'}, "
                        f"1/tau <= {m.get('max_logit_scale')})"),
        ("optimizer", f"AdamW, lr {t.get('lr')}, weight decay {t.get('weight_decay')}, "
                      f"cosine with {t.get('warmup_steps')} warmup steps, grad clip {t.get('grad_clip')}"),
        ("epochs x batch size", f"{t.get('epochs')} x {t.get('batch_size')}"),
        ("image size / augmentation", f"{d.get('image_size')} px / {'on' if d.get('augment') else 'off'}"),
    ]
    ds = summary.get("dataset", {})
    if ds:
        rows.append(("data", f"{ds.get('source')}: {ds.get('train_images')} train images "
                             f"({ds.get('train_captions')} captions), {ds.get('val_images')} val images "
                             f"({ds.get('val_captions')} captions)"))
    hw = summary.get("hardware", {})
    if hw:
        dev = hw.get("gpu") or f"{hw.get('cpu')} ({hw.get('cpu_count')} cores)"
        rows.append(("hardware", f"{hw.get('device')}: {dev}; torch {hw.get('torch')}"))
    if "train_seconds" in summary:
        rows.append(("training time", _fmt_seconds(summary["train_seconds"])))
    params = summary.get("parameters")
    if params:
        rows.append(("parameters", f"{params['trainable']:,} trainable of {params['total']:,}"))
    lines += [f"| {k} | {v} |" for k, v in rows] + [""]

    if final and "image_to_text" in final:
        proto = final.get("protocol") or (f"{final.get('num_images')} validation images x "
                                           f"{final.get('num_captions')} captions, all captions per image")
        lines += ["## Retrieval (Recall@K, %)", "", f"Protocol: {proto}.", ""] + _recall_table(final) + [""]
    if run.curves.is_file():
        lines += ["## Training curves", "", f"![training curves]({run.curves.name})", ""]
    lines += ["## Training stability", ""] + [f"- {n}" for n in stability_notes(epochs, t.get("batch_size", 1))]
    lines += ["", "## Health warnings", ""] + health_lines(read_records(run.metrics, "warning"))
    lines += ["", "## How it works", "",
              "The text encoder is frozen: every caption is embedded once and cached. Only the image "
              "tower (CNN backbone + MLP head) is trained, with a symmetric InfoNCE loss that pulls each "
              "image towards the embedding of one of its captions and away from the other captions in "
              "the batch, so the image embeddings learn to live in the text encoder's space.", ""]
    out = run.root / "report.md"
    out.write_text("\n".join(lines))
    return out
