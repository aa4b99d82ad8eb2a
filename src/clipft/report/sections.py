"""The report's sections that are read from the run's own files (see `clipft.report`)."""

from __future__ import annotations

import json
from pathlib import Path

from ..eval.evaluate import DIRECTIONS
from ..loss import chance_loss
from ..eval.pictures import DATA_SAMPLES_PNG, HEATMAP_PNG, IMAGE_TO_TEXT_PNG, TEXT_TO_IMAGE_PNG
from ..train.rundir import RunFiles, read_records


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
    return notes


def health_lines(warnings: list[dict]) -> list[str]:
    """Markdown bullets for the "warning" records of metrics.jsonl (see clipft.train.health)."""
    if not warnings:
        return ["- None raised. Checked during training: loss within 2% of chance after warmup, embedding "
                "collapse (mean pairwise cosine > 0.95), logit scale pinned at its clamp, validation recall "
                "falling while train loss falls."]
    return [f"- **{w.get('kind')}** (epoch {w.get('epoch')}, step {w.get('step')}): {w.get('message')}"
            for w in warnings]


def _backbone_row(m: dict, summary: dict) -> str:
    """The tower named (torchvision / timm architecture), its parameter count and its weights' source."""
    from ..backbones import describe_backbone, describe_weights
    total = (summary.get("parameters") or {}).get("total")
    size = f", {total / 1e6:.1f} M parameters (tower)" if total else ""
    return (f"{describe_backbone(str(m.get('backbone')))}{size}; init: {describe_weights(m)}; "
            f"{m.get('pooling', 'avg')} pooling, head hidden {m.get('head_hidden')}")


def _recipe(t: dict, d: dict) -> str:
    """The objective's levers (train.loss, train.text_negatives, train.image_queue, train.ema,
    data.batch_sampler); older configs without them read as the defaults."""
    neg = str(t.get("text_negatives", "batch"))
    parts = ["SigLIP sigmoid loss" if t.get("loss", "infonce") == "siglip" else "symmetric InfoNCE",
             {"batch": "in-batch captions", "all": "every training caption as negatives"}.get(
                 neg, f"batch + {neg} bank captions per step")]
    if t.get("image_queue", 0):
        parts.append(f"image queue {t['image_queue']}")
    parts.append(f"EMA {t['ema']}" if t.get("ema", 0) else "no EMA")
    parts.append(f"{d.get('batch_sampler', 'random')} batches")
    return ", ".join(parts)


def setup_section(run: RunFiles, cfg: dict, summary: dict, epochs: list[dict]) -> list[str]:
    """Hyperparameters, data sizes, hardware, time and parameter counts, as a table."""
    t, m, d, x = cfg.get("train", {}), cfg.get("model", {}), cfg.get("data", {}), cfg.get("text", {})
    lines = ["## Setup", "", "| setting | value |", "|---|---|"]
    rows = [
        ("image backbone", _backbone_row(m, summary)),
        ("text encoder (frozen)", f"`{x.get('encoder')}`"),
        ("temperature", f"{m.get('temperature')} ({'learnable' if m.get('learnable_temperature') else 'fixed'}, "
                        f"1/tau <= {m.get('max_logit_scale')})"),
        ("optimizer", f"AdamW, lr {t.get('lr')}, weight decay {t.get('weight_decay')}, "
                      f"cosine with {t.get('warmup_steps')} warmup steps, grad clip {t.get('grad_clip')}"),
        ("epochs x batch size", f"{t.get('epochs')} x {t.get('batch_size')}"),
        ("image size / augmentation", f"{d.get('image_size')} px / {'on' if d.get('augment') else 'off'}"),
        ("contrastive recipe", _recipe(t, d)),
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
    prec = summary.get("precision")
    if prec:  # runtime.select_precision's record
        layout = " + channels_last" if prec.get("channels_last") else ""
        rows.append(("precision", f"{prec.get('dtype')}{layout} ({prec.get('reason')})"))
    if "train_seconds" in summary:
        rows.append(("training time", _fmt_seconds(summary["train_seconds"]) + _speed(epochs, read_records(run.metrics, "step"))))
    if "wall_seconds_this_invocation" in summary:
        rows.append(("wall time of the last train command", _fmt_seconds(summary["wall_seconds_this_invocation"])
                     + " (data loading, text cache, training, evaluation)"))
    params = summary.get("parameters")
    if params:
        rows.append(("parameters", f"{params['trainable']:,} trainable of {params['total']:,}"))
    return lines + [f"| {k} | {v} |" for k, v in rows] + [""]


# --------------------------------------------------------------------------- evaluation sections

# Protocol order in the report: training-time subset first, the published-comparable split last.
_PROTOCOL_ORDER = {"val": 0, "val-full": 1, "val-heldout": 2, "karpathy-val": 3, "karpathy-test": 4,
                   "karpathy-test-1k": 5, "test": 6}


def _metrics_files(root: Path) -> list[tuple[str, dict]]:
    """(split, metrics) of every metrics_<split>.json in the run, or the legacy metrics.json."""
    found = []
    for f in root.glob("metrics_*.json"):
        m = _load_json(f)
        if "image_to_text" in m:
            found.append((m.get("split") or f.stem[len("metrics_"):], m))
    found.sort(key=lambda x: (_PROTOCOL_ORDER.get(x[0], 9), x[0]))
    return found


def _comparison_table(metrics: dict) -> list[str]:
    zs = metrics["zero_shot"]
    lines = [f"| direction | K | fine-tuned | zero-shot `{zs['model']}` | difference |", "|---|---:|---:|---:|---:|"]
    for d in DIRECTIONS:
        for k, v in metrics[d].items():
            lines.append(f"| {d.replace('_to_', ' -> ')} | {k.split('@')[1]} | {v:.2f} | {zs[d][k]:.2f} | "
                         f"{v - zs[d][k]:+.2f} |")
    return lines


def _fold_spread(metrics: dict) -> list[str]:
    """The per-fold spread of a protocol with folds (karpathy-test-1k): the table above is the mean."""
    f = metrics["folds"]
    lines = ["", f"Mean over {f['count']} folds; the spread across folds (sample std, min-max):", "",
             "| direction | K | mean | std | min | max |", "|---|---:|---:|---:|---:|---:|"]
    for d in DIRECTIONS:
        for k, v in metrics[d].items():
            lines.append(f"| {d.replace('_to_', ' -> ')} | {k.split('@')[1]} | {v:.2f} | {f['std'][d][k]:.2f} | "
                         f"{f['min'][d][k]:.2f} | {f['max'][d][k]:.2f} |")
    return lines


def retrieval_section(root: Path, final: dict, chosen_by: str = "", figures: dict[str, str] | None = None,
                      missing: str | None = None) -> list[str]:
    """One Recall@K table per evaluated protocol (metrics_<split>.json), each naming its protocol;
    `chosen_by` says which checkpoint was measured and which split chose it, `figures` maps a split
    to its fine-tuned vs zero-shot CLIP chart, `missing` says how to fill an absent section."""
    files = _metrics_files(root)
    if not files and final and "image_to_text" in final:
        files = [(final.get("split", "val"), final)]
    lines = ["## Retrieval (Recall@K, %)", ""]
    if not files:
        return lines + [f"*Missing:* {missing}." if missing else "*Missing:* no validation record in this run.", ""]
    lines += ["COCO protocol: every image is a query against all captions of the split (a hit if any of its "
              "own captions ranks in the top K), and every caption is a query against all images. Published "
              "COCO numbers use the Karpathy 5k test split (`--split karpathy-test`); figures on other "
              "protocols are comparable only with the same protocol.", ""]
    lines += [chosen_by, ""] if chosen_by else []
    for split, m in files:
        proto = m.get("protocol") or (f"{m.get('num_images')} images x {m.get('num_captions')} captions, "
                                      "all captions per image")
        lines += [f"### `{split}`", "", f"Protocol: {proto}.", ""]
        lines += _comparison_table(m) if "zero_shot" in m else _recall_table(m)
        if "folds" in m:
            lines += _fold_spread(m)
        if m.get("skipped_images"):
            lines += ["", f"{m['skipped_images']} unreadable image(s) were left out with their captions."]
        lines.append("")
        if figures and split in figures:
            lines += [f"![fine-tuned vs zero-shot CLIP on {split}]({figures[split]})", ""]
    return lines


def zero_shot_section(root: Path, missing: str | None = None, provenance: dict[str, dict] | None = None) -> list[str]:
    """Zero-shot accuracy from every zeroshot_<split>.json, with its pictures ([] when there is none
    and nothing is `missing`; else the section says what is missing and how to fill it)."""
    lines: list[str] = ["## Zero-shot classification", "", f"*Missing:* {missing}.", ""] if missing else []
    for f in sorted(root.glob("zeroshot_*.json")):
        z = _load_json(f)
        if "top1" not in z:
            continue
        if not lines:
            lines = ["## Zero-shot classification", ""]
        templates = ", ".join(f"`{t}`" for t in z.get("templates", []))
        lines += [f"### `{z.get('split')}`: {len(z.get('classes', []))} classes", "",
                  f"Each class name is put into the prompt templates {templates}; a class's embedding is the mean "
                  f"of its prompt embeddings from the frozen text encoder `{z.get('text_encoder')}`, and an "
                  f"image's class probabilities are softmax(1/tau x cosine) with the run's 1/tau = "
                  f"{z.get('logit_scale', 0):.1f}. Ground truth: {z.get('rule')}. "
                  f"{z.get('num_images')} images scored, {z.get('unlabelled_images')} without a single label "
                  "left out.", "",
                  "| metric | accuracy (%) | chance (%) |", "|---|---:|---:|",
                  f"| top-1 | {z['top1']:.2f} | {z['chance_top1']:.2f} |",
                  f"| top-5 | {z['top5']:.2f} | {z['chance_top5']:.2f} |", ""]
        per = [(c, v) for c, v in z.get("per_class", {}).items() if v.get("top1") is not None and v.get("n", 0) >= 3]
        if per:
            per.sort(key=lambda cv: cv[1]["top1"])
            worst = ", ".join(f"{c} {v['top1']:.0f}% (n={v['n']})" for c, v in per[:3])
            best = ", ".join(f"{c} {v['top1']:.0f}% (n={v['n']})" for c, v in per[::-1][:3])
            lines += [f"Hardest classes (top-1, at least 3 images): {worst}. Easiest: {best}.", ""]
        for key, alt in (("examples_png", "zero-shot examples"), ("confusion_png", "zero-shot confusion matrix")):
            name = Path(z.get(key) or "").name
            if name and (root / name).is_file():
                rule = (provenance or {}).get(name, {}).get("rule")
                lines += [f"![{alt}]({name})", ""] + ([f"Examples: {rule}.", ""] if rule and key == "examples_png" else [])
    return lines


def pictures_section(root: Path, provenance: dict[str, dict] | None = None,
                     missing: dict[str, str] | None = None) -> list[str]:
    """The qualitative retrieval pictures in RUN, each with the rule that chose its examples (from
    report_pictures.json when the report drew it), and what is missing with its command."""
    pics = [(TEXT_TO_IMAGE_PNG, "text_to_image", "Text -> image: the top-5 images per caption query; the "
                                "caption's own image is framed green."),
            (IMAGE_TO_TEXT_PNG, "image_to_text", "Image -> text: the top-5 captions per image query; the image's "
                                "own captions are green."),
            (HEATMAP_PNG, "heatmap", "Cosine similarity of images with their own and each other's captions; a "
                          "bright diagonal block means an image is closer to its own captions than to the others.")]
    lines = ["## Qualitative retrievals", ""]
    for f, key, text in pics:
        if not (root / f).is_file():
            if missing and key in missing:
                lines += [f"*Missing:* {missing[key]}.", ""]
            continue
        p = (provenance or {}).get(f)
        how = (f" Chosen by rule: {p['rule']}; measured with {p['from']}." if p else
               " Drawn by an earlier `clipft visualize` or `clipft demo` (seeded random queries, newer than the "
               "checkpoint, so reused here).")
        lines += [f"![{f[:-4].replace('_', ' ')}]({f})", "", text + how, ""]  # the caption under its picture
    if len(lines) == 2:
        from .complete import data_hint
        lines += ["*Missing:* no retrieval picture in this run directory: `clipft report "
                  f"{root} --data {data_hint(root)}` draws them.", ""]
    return lines


# --------------------------------------------------------------------------- logs and loss

def _speed(epochs: list[dict], steps: list[dict]) -> str:
    parts = []
    secs = [r["train_seconds"] for r in epochs if r.get("train_seconds")]
    if secs:
        parts.append(f"{sum(secs) / len(secs):.1f} s per epoch")
    ips = sorted(r["images_per_s"] for r in steps if r.get("images_per_s"))
    if ips:
        parts.append(f"median {ips[len(ips) // 2]:.0f} images/s")
    return f" ({', '.join(parts)})" if parts else ""


def loss_spikes(steps: list[dict], ratio: float = 1.5, window: int = 5) -> list[dict]:
    """Logged steps whose loss exceeds `ratio` x the median of the previous `window` logged losses
    (at least 3 needed): [{"step", "loss", "median"}]."""
    import statistics
    losses = [(r["step"], r["loss"]) for r in steps if isinstance(r.get("loss"), (int, float))]
    out = []
    for i in range(3, len(losses)):
        med = statistics.median(v for _, v in losses[max(0, i - window):i])
        step, loss = losses[i]
        if loss != loss or loss > ratio * med:  # NaN counts as a spike
            out.append({"step": step, "loss": loss, "median": med})
    return out


def log_observations(steps: list[dict], epochs: list[dict], log_every: int | None = None) -> list[str]:
    """Loss spikes, gradient norms and over-fitting signs, in words, from metrics.jsonl records."""
    notes = []
    if steps:
        spikes = loss_spikes(steps)
        every = f", one record every {log_every} steps" if log_every else ""
        if spikes:
            worst = max(spikes, key=lambda sp: sp["loss"] / max(sp["median"], 1e-9))
            notes.append(f"{len(spikes)} loss spike(s) among {len(steps)} logged steps{every} (loss above 1.5x the "
                         f"median of the previous 5); largest at step {worst['step']}: {worst['loss']:.3f} vs "
                         f"{worst['median']:.3f}.")
        else:
            notes.append(f"No loss spike among {len(steps)} logged steps{every} (a spike: loss above 1.5x the "
                         "median of the previous 5).")
        norms = [r["grad_norm"] for r in steps if isinstance(r.get("grad_norm"), (int, float)) and r["grad_norm"] == r["grad_norm"]]
        if norms:
            notes.append(f"Gradient norm before clipping: median {sorted(norms)[len(norms) // 2]:.2f}, "
                         f"max {max(norms):.2f}.")
    with_val = [r for r in epochs if r.get("val_loss") is not None]
    if len(with_val) >= 2:
        lo = min(with_val, key=lambda r: r["val_loss"])
        first_gap = with_val[0]["val_loss"] - with_val[0]["train_loss"]
        last_gap = with_val[-1]["val_loss"] - with_val[-1]["train_loss"]
        notes.append(f"Val - train loss gap went from {first_gap:+.3f} (epoch {with_val[0]['epoch']}) to "
                     f"{last_gap:+.3f} (epoch {with_val[-1]['epoch']}); lowest val loss {lo['val_loss']:.3f} at epoch "
                     f"{lo['epoch']}.")
        if lo is not with_val[-1] and with_val[-1]["val_loss"] > lo["val_loss"] * 1.02 \
                and with_val[-1]["train_loss"] < lo["train_loss"]:
            notes.append(f"Over-fitting sign: val loss rose {with_val[-1]['val_loss'] - lo['val_loss']:+.3f} after "
                         f"epoch {lo['epoch']} while train loss kept falling; more data, augmentation "
                         "(data.augment=true) or fewer epochs would help.")
        else:
            notes.append("No over-fitting sign: val loss did not rise while train loss fell.")
        best = max((r for r in with_val if "mean_R@5" in r), key=lambda r: r["mean_R@5"], default=None)
        if best is not None and best is not with_val[-1] and "mean_R@5" in with_val[-1]:
            notes.append(f"Mean val R@5 at the last epoch is {with_val[-1]['mean_R@5'] - best['mean_R@5']:+.2f} "
                         f"points from its best (epoch {best['epoch']}); best.pt holds epoch {best['epoch']}.")
    return notes


def loss_explanation(cfg: dict, final_logit_scale: float | None = None) -> list[str]:
    """The contrastive loss in words, with this run's batch size and temperature (and, for a learned
    temperature, the value it ended at: `final_logit_scale` = 1/tau of the last epoch)."""
    t, m = cfg.get("train", {}), cfg.get("model", {})
    b = t.get("batch_size", "B")
    tau = m.get("temperature", 0.07)
    neg = b - 1 if isinstance(b, int) else "B-1"
    chance = f"{chance_loss(b):.2f}" if isinstance(b, int) else "ln B"
    learn = "fixed"
    if m.get("learnable_temperature"):
        learn = f"learned from this initial value, 1/tau clamped to at most {m.get('max_logit_scale')}"
        if final_logit_scale:
            learn += f"; it ended at 1/tau = {final_logit_scale:.1f}, tau = {1 / final_logit_scale:.4f}"
    return ["## How it works", "",
            "The text encoder is frozen: every caption is embedded once and cached. Only the image tower "
            "(CNN backbone + MLP head) is trained, so the image embeddings learn to live in the text encoder's "
            "space.", "",
            f"Each training batch holds {b} images, each with one of its captions (a different one each epoch). "
            "The loss is a symmetric InfoNCE (the CLIP loss):", "",
            "- **Anchors**: every image in the batch is an anchor for the image->text term, and every caption "
            "is an anchor for the text->image term.",
            "- **Positive**: the anchor's own pair (the image's caption, or the caption's image).",
            f"- **Negatives**: the other {neg} captions (or images) of the same batch; no negatives are mined "
            "or stored, so a larger batch gives more and harder negatives.",
            f"- **Temperature**: cosine similarities (in [-1, 1]) are divided by tau = {tau} ({learn}), i.e. "
            f"multiplied by 1/tau = {1 / tau:.1f}, before a softmax over the batch. A small tau sharpens the "
            "softmax so that the loss concentrates on the hardest negatives.", "",
            f"Each term is the cross-entropy of picking the positive among the {b} candidates; the loss is their "
            f"mean. Guessing uniformly gives ln({b}) = {chance}, the chance level quoted above.", ""]


def config_dump(cfg: dict) -> list[str]:
    """The full resolved config (config.json), collapsed."""
    if not cfg:
        return []
    return ["<details><summary>Full resolved configuration (config.json)</summary>", "", "```json",
            json.dumps(cfg, indent=2), "```", "", "</details>", ""]
