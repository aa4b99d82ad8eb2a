"""Pictures (matplotlib, PNG, readable without zooming)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: runs on servers and in CI
import matplotlib.pyplot as plt  # noqa: E402


def plot_training_curves(epochs: list[dict], path: str | Path) -> Path | None:
    """Two panels: train/val loss per epoch, and validation Recall@K per epoch (both directions).

    `epochs` are the "epoch" records of metrics.jsonl. Returns the path, or None without records.
    """
    if not epochs:
        return None
    path = Path(path)
    fig, (ax_loss, ax_rec) = plt.subplots(1, 2, figsize=(12, 4.5))
    x = [r["epoch"] for r in epochs]
    ax_loss.plot(x, [r["train_loss"] for r in epochs], "o-", label="train loss")
    val = [(r["epoch"], r["val_loss"]) for r in epochs if r.get("val_loss") is not None]
    if val:
        ax_loss.plot(*zip(*val), "s-", label="val loss")
    ax_loss.set(xlabel="epoch", ylabel="symmetric InfoNCE", title="Loss")
    ax_loss.grid(alpha=0.3)
    ax_loss.legend()

    with_val = [r for r in epochs if "val" in r]
    styles = {"image_to_text": "-", "text_to_image": "--"}
    names = {"image_to_text": "image->text", "text_to_image": "text->image"}
    if with_val:
        for direction, ls in styles.items():
            for k in with_val[0]["val"][direction]:
                ax_rec.plot([r["epoch"] for r in with_val], [r["val"][direction][k] for r in with_val],
                            ls, marker="o", label=f"{names[direction]} {k}")
    ax_rec.set(xlabel="epoch", ylabel="recall (%)", title="Validation Recall@K", ylim=(0, 100))
    ax_rec.grid(alpha=0.3)
    if with_val:
        ax_rec.legend(fontsize=8, ncol=2)
    if len(x) == 1:
        for ax in (ax_loss, ax_rec):
            ax.set_xticks(x)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
