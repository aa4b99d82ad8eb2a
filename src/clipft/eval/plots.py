"""Pictures (matplotlib, PNG, readable without zooming)."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: runs on servers and in CI
import matplotlib.pyplot as plt  # noqa: E402


CURVES_INCHES = (15, 4.5)  # three panels, saved at 110 dpi


def loss_chance(n: int) -> float | None:
    """The symmetric InfoNCE of a model that knows nothing (uniform logits) over a batch of n pairs:
    ln n in each direction, so ln n for their mean. None for n < 2."""
    return math.log(n) if n and n >= 2 else None


def val_loss_chance(num_images: int, batch_size: int) -> float | None:
    """Chance level of evaluation's val_loss, which is computed in fixed batches of `batch_size` over the
    `num_images` validation images (a last batch of 1 skipped) and averaged weighted by batch size."""
    sizes = [min(batch_size, num_images - s) for s in range(0, num_images, batch_size)]
    sizes = [n for n in sizes if n >= 2]
    return sum(n * math.log(n) for n in sizes) / sum(sizes) if sizes else None


def run_batch_size(run_dir: str | Path) -> int | None:
    """train.batch_size of a run directory's config.json (None when it cannot be read)."""
    import json
    try:
        return int(json.loads((Path(run_dir) / "config.json").read_text())["train"]["batch_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def training_curves_figure(epochs: list[dict], batch_size: int | None = None):
    """The figure of `plot_training_curves`: train loss, validation loss and Recall@K, one panel each.
    The two losses have different chance levels (ln B over a training batch of B pairs; the validation
    batches' ln n), so each gets its own panel and its dashed chance line (when batch_size is known)."""
    from matplotlib.ticker import MaxNLocator
    fig, (ax_train, ax_val, ax_rec) = plt.subplots(1, 3, figsize=CURVES_INCHES)
    x = [r["epoch"] for r in epochs]
    ax_train.plot(x, [r["train_loss"] for r in epochs], "o-", label="train loss")
    if (c := loss_chance(batch_size)) is not None:
        ax_train.axhline(c, color="grey", ls="--", label=f"chance: ln {batch_size} = {c:.2f}")
    ax_train.set(xlabel="epoch", ylabel="symmetric InfoNCE", title="Training loss (batch mean)")
    val = [(r["epoch"], r["val_loss"]) for r in epochs if r.get("val_loss") is not None]
    if val:
        ax_val.plot(*zip(*val), "s-", color="C1", label="val loss")
        n_val = next((r["val"].get("num_images") for r in reversed(epochs) if isinstance(r.get("val"), dict)
                      and r["val"].get("num_images")), None)
        if batch_size and n_val and (c := val_loss_chance(int(n_val), batch_size)) is not None:
            ax_val.axhline(c, color="grey", ls="--", label=f"chance over {n_val} images = {c:.2f}")
    else:
        ax_val.text(0.5, 0.5, "no validation loss logged", ha="center", va="center", transform=ax_val.transAxes)
    ax_val.set(xlabel="epoch", ylabel="symmetric InfoNCE", title="Validation loss")

    with_val = [r for r in epochs if "val" in r]
    styles = {"image_to_text": "-", "text_to_image": "--"}
    names = {"image_to_text": "image->text", "text_to_image": "text->image"}
    if with_val:
        for direction, ls in styles.items():
            for k in with_val[0]["val"][direction]:
                ax_rec.plot([r["epoch"] for r in with_val], [r["val"][direction][k] for r in with_val],
                            ls, marker="o", label=f"{names[direction]} {k}")
    ax_rec.set(xlabel="epoch", ylabel="recall (%)", title="Validation Recall@K", ylim=(0, 100))
    for ax in (ax_train, ax_val, ax_rec):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, ncol=2 if ax is ax_rec else 1)
    fig.tight_layout()
    return fig


def plot_training_curves(epochs: list[dict], path: str | Path, batch_size: int | None = None) -> Path | None:
    """Three panels: training loss, validation loss (each with its chance line when `batch_size`, the
    run's train.batch_size, is known) and validation Recall@K per epoch (both directions).

    `epochs` are the "epoch" records of metrics.jsonl. Returns the path, or None without records.
    """
    if not epochs:
        return None
    path = Path(path)
    fig = training_curves_figure(epochs, batch_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- retrieval and zero-shot pictures
# Every figure has a fixed size in inches and is saved at DPI without bbox_inches="tight", so its
# pixel size is known in advance (tests check it): width x height = inches * DPI.

DPI = 100
_OK = "#1a9641"  # green: ground truth / correct
_MISS = "#b0b0b0"
_BAR = "#4a7ab5"


def _thumb(path: str | Path, side: int = 256):
    """RGB thumbnail as a numpy array (a grey placeholder with a note for an unreadable file)."""
    import numpy as np

    from ..data import load_image
    img, _reason = load_image(path)
    if img is None:
        return np.full((side, side, 3), 200, dtype=np.uint8)
    img.thumbnail((side, side))
    return np.asarray(img)


def _wrap(text: str, width: int, indent: str = "") -> str:
    import textwrap
    return "\n".join(textwrap.wrap(text, width=width, subsequent_indent=indent)) or text


def _frame(ax, color: str, width: float = 5.0) -> None:
    for spine in ax.spines.values():
        spine.set_visible(True)
        spine.set_edgecolor(color)
        spine.set_linewidth(width)


def _image_axis(ax, path, title: str = "", color: str | None = None, title_color: str = "black") -> None:
    ax.imshow(_thumb(path))
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    if color:
        _frame(ax, color)
    if title:
        ax.set_title(title, fontsize=11, color=title_color)


def _top(height_px: int, extra_in: float = 0.0) -> float:
    """Figure fraction that leaves ~0.75 inch (+extra) at the top for the suptitle and row titles."""
    return 1.0 - (0.75 + extra_in) / (height_px / DPI)


def _save(fig, path: str | Path) -> Path:
    """Write fig; returns the path written. A name without a picture suffix (`--out samples`) gets .png, the
    file savefig would write anyway, so that the `wrote ...` line names the file that exists."""
    path = Path(path)
    if path.suffix.lstrip(".").lower() not in fig.canvas.get_supported_filetypes():
        path = path.with_name(path.name + ".png")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def text_to_image_size(n_queries: int, k: int = 5) -> tuple[int, int]:
    """Pixel size of `plot_text_to_image`'s figure."""
    return int(round((3.4 + 2.1 * k) * DPI)), int(round((2.6 * n_queries + 0.6) * DPI))


def plot_text_to_image(results: list[dict], path: str | Path) -> Path:
    """One row per query: the query text, then its top-K images with their cosine scores.

    results: [{"query": str, "top": [(image path, score, is_correct), ...], "correct_rank": int | None}]
    (correct_rank: 0-based rank of the correct image when the query is a dataset caption, else None;
    an optional "tag" says how the query was chosen and is printed under it).
    The correct image gets a green frame and a check mark.
    """
    k = max(len(r["top"]) for r in results)
    w, h = text_to_image_size(len(results), k)
    fig = plt.figure(figsize=(w / DPI, h / DPI))
    gs = fig.add_gridspec(len(results), k + 1, width_ratios=[3.4] + [2.1] * k, left=0.01, right=0.99,
                          top=_top(h), bottom=0.02, wspace=0.08, hspace=0.35)
    for r_i, r in enumerate(results):
        ax = fig.add_subplot(gs[r_i, 0])
        ax.axis("off")
        note = f"\n\n[{r['tag']}]" if r.get("tag") else ""  # how the query was chosen (the report's rule)
        if r.get("correct_rank") is not None:
            rank = r["correct_rank"] + 1
            note = f"\n\ncorrect image: rank {rank}" + (" (not shown)" if rank > k else "")
        ax.text(0.0, 0.5, _wrap(f"\u201c{r['query']}\u201d", 30) + note, fontsize=11, va="center", ha="left",
                transform=ax.transAxes)
        for j, (img_path, score, correct) in enumerate(r["top"]):
            ax = fig.add_subplot(gs[r_i, j + 1])
            _image_axis(ax, img_path, f"#{j + 1}  {score:.3f}" + ("  \u2713" if correct else ""),
                        color=_OK if correct else None, title_color=_OK if correct else "black")
    fig.suptitle("Text \u2192 image: top-5 images per query (cosine similarity; green = the caption's own image)",
                 fontsize=12)
    return _save(fig, path)


def image_to_text_size(n_images: int) -> tuple[int, int]:
    """Pixel size of `plot_image_to_text`'s figure."""
    return int(round(12.0 * DPI)), int(round((2.8 * n_images + 0.6) * DPI))


def _image_beside_text_rows(paths: list, size: tuple[int, int]):
    """A figure of len(paths) rows, each an image (left) beside an empty text axis (right);
    returns (figure, the text axes)."""
    w, h = size
    fig = plt.figure(figsize=(w / DPI, h / DPI))
    gs = fig.add_gridspec(len(paths), 2, width_ratios=[2.3, 9.7], left=0.01, right=0.99,
                          top=_top(h), bottom=0.02, wspace=0.03, hspace=0.3)
    text_axes = []
    for r_i, path in enumerate(paths):
        _image_axis(fig.add_subplot(gs[r_i, 0]), path)
        ax = fig.add_subplot(gs[r_i, 1])
        ax.axis("off")
        text_axes.append(ax)
    return fig, text_axes


def plot_image_to_text(results: list[dict], path: str | Path) -> Path:
    """One row per image: the image beside its top-K captions with scores; its own (ground-truth)
    captions are green with a check mark.

    results: [{"path": image path, "top": [(caption, score, is_ground_truth), ...], "gt_rank": int}]
    (an optional "tag" says how the image was chosen and is printed beside its rank)
    """
    fig, text_axes = _image_beside_text_rows([r["path"] for r in results], image_to_text_size(len(results)))
    for r, ax in zip(results, text_axes):
        n = len(r["top"])
        for j, (caption, score, gt) in enumerate(r["top"]):
            mark = "\u2713" if gt else "  "
            ax.text(0.0, 1 - (j + 0.5) / (n + 1), _wrap(f"{mark} #{j + 1}  {score:.3f}   {caption}", 105, "              "),
                    fontsize=10, va="center", ha="left", color=_OK if gt else "black",
                    fontweight="bold" if gt else "normal", transform=ax.transAxes)
        tag = f"   [{r['tag']}]" if r.get("tag") else ""
        ax.text(0.0, 0.5 / (n + 1), f"best ground-truth caption at rank {r['gt_rank'] + 1}{tag}", fontsize=9.5,
                color="dimgray", va="center", transform=ax.transAxes)
    fig.suptitle("Image \u2192 text: top-5 captions per image (green \u2713 = one of the image's own captions)",
                 fontsize=12)
    return _save(fig, path)


def zero_shot_size(n_images: int, per_row: int = 2) -> tuple[int, int]:
    """Pixel size of `plot_zero_shot`'s figure."""
    rows = -(-n_images // per_row)
    return int(round(6.6 * per_row * DPI)), int(round((2.8 * rows + 0.9) * DPI))


def plot_zero_shot(items: list[dict], classes: list[str], path: str | Path, top: int = 8,
                   per_row: int = 2) -> Path:
    """Each image beside a horizontal bar chart of its `top` most probable classes.

    items: [{"path": image path, "probs": tensor [C], "target": class index or None}]; the true
    class's bar is green (shown even when it is not among the top ones), the others blue.
    """
    w, h = zero_shot_size(len(items), per_row)
    rows = -(-len(items) // per_row)
    fig = plt.figure(figsize=(w / DPI, h / DPI))
    gs = fig.add_gridspec(rows, 2 * per_row, width_ratios=[2.6, 4.0] * per_row, left=0.02, right=0.98,
                          top=_top(h), bottom=0.55 / (h / DPI), wspace=0.75, hspace=0.55)
    for i, it in enumerate(items):
        r, c = divmod(i, per_row)
        probs = it["probs"]
        order = probs.argsort(descending=True).tolist()[:top]
        t = it.get("target")
        if t is not None and t not in order:
            order = order[:-1] + [t]
        pred = order[0]
        title = Path(it["path"]).name  # which image this is: its file name, always
        if t is not None:
            title = ("\u2713 " if pred == t else "\u2717 ") + f"true: {classes[t]}\n{title}"
        _image_axis(fig.add_subplot(gs[r, 2 * c]), it["path"], title or "",
                    title_color=(_OK if t is not None and pred == t else "firebrick") if t is not None else "black")
        ax = fig.add_subplot(gs[r, 2 * c + 1])
        vals = [float(probs[j]) for j in order][::-1]
        names = [classes[j] for j in order][::-1]
        colors = [_OK if j == t else _BAR for j in order][::-1]
        ax.barh(range(len(order)), vals, color=colors)
        ax.set_yticks(range(len(order)), names, fontsize=10)
        ax.set_xlim(0, 1)
        ax.set_xlabel("probability", fontsize=10)
        ax.tick_params(axis="x", labelsize=9)
        for y, v in enumerate(vals):
            ax.text(min(v + 0.02, 0.8), y, f"{v:.2f}", va="center", fontsize=9)
    # "green = true class" only when some image has one (`clipft zeroshot --image` has none)
    legend = " (green = true class)" if any(it.get("target") is not None for it in items) else ""
    fig.suptitle(f"Zero-shot classification: class probabilities per image{legend}", fontsize=12)
    return _save(fig, path)


HEATMAP_SIZE = (1000, 800)  # pixels of `plot_similarity_heatmap`


def plot_similarity_heatmap(sim, image_labels: list[str], caption_owner: list[int], path: str | Path) -> Path:
    """Cosine similarity of N images (rows) x their captions (columns, grouped by image).

    sim [N, M] (tensor or array); caption_owner [M]: row index of each caption's image. The
    image's own captions form the diagonal blocks, outlined.
    """
    import numpy as np
    sim = np.asarray(sim, dtype=float)
    fig = plt.figure(figsize=(HEATMAP_SIZE[0] / DPI, HEATMAP_SIZE[1] / DPI))
    ax = fig.add_axes((0.2, 0.12, 0.66, 0.8))
    cax = fig.add_axes((0.88, 0.12, 0.02, 0.8))
    im = ax.imshow(sim, cmap="viridis", aspect="auto", interpolation="nearest")
    fig.colorbar(im, cax=cax, label="cosine similarity")
    owner = np.asarray(caption_owner)
    for i in range(sim.shape[0]):
        cols = np.nonzero(owner == i)[0]
        if cols.size:
            ax.add_patch(plt.Rectangle((cols.min() - 0.5, i - 0.5), cols.size, 1, fill=False, edgecolor="red", lw=2))
    ax.set_yticks(range(sim.shape[0]), image_labels, fontsize=10)
    bounds = [int(np.nonzero(owner == i)[0].mean()) for i in range(sim.shape[0]) if (owner == i).any()]
    ax.set_xticks(bounds, [f"img {i + 1}" for i in range(sim.shape[0]) if (owner == i).any()], fontsize=9,
                  rotation=90 if sim.shape[0] > 12 else 0)
    ax.set_xlabel("captions (grouped by their image)", fontsize=11)
    ax.set_ylabel("images", fontsize=11)
    ax.set_title(f"Image x caption similarity: {sim.shape[0]} images x {sim.shape[1]} captions "
                 "(red = own captions)", fontsize=12)
    return _save(fig, path)


def confusion_size(num_classes: int) -> tuple[int, int]:
    """Pixel size of `plot_confusion_matrix`'s figure (square, grows with the class count)."""
    side = max(6.0, 0.24 * num_classes + 3.0)
    return int(round(side * DPI)), int(round(side * DPI))


def plot_confusion_matrix(cm, classes: list[str], path: str | Path, title: str = "Confusion matrix") -> Path:
    """Row-normalised confusion matrix (row = true class, column = predicted), counts in cells
    when there are at most 15 classes."""
    import numpy as np
    cm = np.asarray(cm, dtype=float)
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    w, h = confusion_size(len(classes))
    fig, ax = plt.subplots(figsize=(w / DPI, h / DPI))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.04, label="fraction of the true class")
    fs = 10 if len(classes) <= 15 else 8
    ax.set_xticks(range(len(classes)), classes, rotation=90, fontsize=fs)
    ax.set_yticks(range(len(classes)), classes, fontsize=fs)
    ax.set_xlabel("predicted class", fontsize=11)
    ax.set_ylabel("true class", fontsize=11)
    if len(classes) <= 15:
        for i in range(len(classes)):
            for j in range(len(classes)):
                if cm[i, j]:
                    ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=9,
                            color="white" if norm[i, j] > 0.5 else "black")
    ax.set_title(title, fontsize=12)
    fig.subplots_adjust(left=0.2, right=0.95, top=0.94, bottom=0.2)
    return _save(fig, path)


def data_samples_size(n: int) -> tuple[int, int]:
    """Pixel size of `plot_data_samples`'s figure."""
    return image_to_text_size(n)


def plot_data_samples(samples: list[dict], path: str | Path, title: str = "") -> Path:
    """Integrity check: each image beside all of its captions. samples: [{"path", "captions", "image_id"}]."""
    fig, text_axes = _image_beside_text_rows([s["path"] for s in samples], data_samples_size(len(samples)))
    for s, ax in zip(samples, text_axes):
        lines = [f"image id {s['image_id']}  ({Path(s['path']).name})"] + [f"\u2022 {_wrap(c, 100)}"
                                                                              for c in s["captions"][:6]]
        n = len(lines)
        for j, line in enumerate(lines):
            ax.text(0.0, 1 - (j + 0.5) / n, line, fontsize=10.5 if j else 10, va="center", ha="left",
                    color="dimgray" if j == 0 else "black", transform=ax.transAxes)
    fig.suptitle(title or "Random image-caption pairs from the dataset", fontsize=12)
    return _save(fig, path)


# --------------------------------------------------------------------------- comparisons (the report)

COMPARISON_SIZE = (1100, 450)  # pixels of `plot_recall_comparison`
RUN_CURVES_SIZE = (1200, 450)  # pixels of `plot_run_curves`


def plot_recall_comparison(models: dict[str, dict], path: str | Path, title: str) -> Path:
    """Grouped bars: one group per (direction, K), one bar per model, each labelled with its value.

    models: {name: metrics with "image_to_text" / "text_to_image" {"R@k": percent}} (same Ks)."""
    import numpy as np
    names = list(models)
    first = models[names[0]]
    groups = [(d, k) for d in ("image_to_text", "text_to_image") for k in first[d]]
    fig, ax = plt.subplots(figsize=(COMPARISON_SIZE[0] / DPI, COMPARISON_SIZE[1] / DPI))
    width = 0.8 / len(names)
    x = np.arange(len(groups))
    for i, name in enumerate(names):
        vals = [float(models[name][d][k]) for d, k in groups]
        bars = ax.bar(x + (i - (len(names) - 1) / 2) * width, vals, width, label=name)
        ax.bar_label(bars, fmt="%.1f", fontsize=8, padding=1)
    ax.set_xticks(x, [f"{'i2t' if d == 'image_to_text' else 't2i'} {k}" for d, k in groups], fontsize=10)
    ax.set(ylabel="recall (%)", ylim=(0, 105))
    ax.set_title(title, fontsize=12)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=9, loc="upper left")
    fig.subplots_adjust(left=0.07, right=0.98, top=0.9, bottom=0.1)
    return _save(fig, path)


def plot_run_curves(runs: dict[str, list[dict]], path: str | Path) -> Path:
    """Two panels for several runs: train loss and mean validation R@5 per epoch.

    runs: {name: the "epoch" records of its metrics.jsonl}."""
    fig, (ax_loss, ax_rec) = plt.subplots(1, 2, figsize=(RUN_CURVES_SIZE[0] / DPI, RUN_CURVES_SIZE[1] / DPI))
    for name, epochs in runs.items():
        ax_loss.plot([r["epoch"] for r in epochs], [r["train_loss"] for r in epochs], "o-", label=name)
        with_val = [r for r in epochs if "mean_R@5" in r]
        ax_rec.plot([r["epoch"] for r in with_val], [r["mean_R@5"] for r in with_val], "o-", label=name)
    ax_loss.set(xlabel="epoch", ylabel="symmetric InfoNCE", title="Train loss")
    ax_rec.set(xlabel="epoch", ylabel="recall (%)", title="Mean validation R@5 (both directions)", ylim=(0, 100))
    for ax in (ax_loss, ax_rec):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=9)
    fig.subplots_adjust(left=0.07, right=0.98, top=0.9, bottom=0.13, wspace=0.25)
    return _save(fig, path)
