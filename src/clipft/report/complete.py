"""The report completes itself: what a run directory lacks is drawn from its checkpoint and data.

Pictures that depend on the model (retrievals, heatmap, zero-shot, the validation metrics) are
reused when they are newer than the checkpoint and redrawn otherwise; pictures of the data alone
(random training pairs) or of the logs (curves) are drawn when absent. Every picture the report
draws gets its selection rule in RUN/report_pictures.json, so the report can state it. What cannot
be drawn (no checkpoint, data moved, no labels) is listed with the command that would fill it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from ..eval.pictures import DATA_SAMPLES_PNG, HEATMAP_PNG, IMAGE_TO_TEXT_PNG, TEXT_TO_IMAGE_PNG
from ..train.rundir import RunFiles, read_records

log = logging.getLogger(__name__)

PROVENANCE_JSON = "report_pictures.json"
N_RANDOM = 3  # seeded random queries per retrieval picture (plus the best and the worst by rank)
HEATMAP_IMAGES = 10


@dataclass
class Completion:
    """What `complete_run` did: files it drew, and sections it could not fill (key -> reason and command)."""
    checkpoint: Path | None = None
    data_root: Path | None = None
    split: str = "val"
    drawn: list[str] = field(default_factory=list)
    missing: dict[str, str] = field(default_factory=dict)


def checkpoint_of(root: Path) -> Path | None:
    """best.pt (chosen by mean validation R@5), else last.pt, else None."""
    for name in ("best.pt", "last.pt"):
        if (root / name).is_file():
            return root / name
    return None


def data_root_candidates(root: Path, summary: dict, data: str | Path | None) -> list[Path]:
    """Where the run's data may be: --data, summary.json's data_root (as given, then relative to
    RUN's parent), RUN/data (the demo keeps its data there)."""
    out = [Path(data)] if data else []
    given = summary.get("data_root")
    if given:
        out += [Path(given), root.parent / given]
    return out + [root / "data"]


def data_hint(root: Path) -> str:
    """The run's data path for a suggested command: summary.json's data_root (or config.json's
    data.path) where it still exists, else the placeholder DATA (data that moved is not suggested)."""
    for name, key in (("summary.json", ("data_root",)), ("config.json", ("data", "path"))):
        try:
            value = json.loads((Path(root) / name).read_text())
            for k in key:
                value = value[k]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if isinstance(value, str) and value and Path(value).exists():
            return value
    return "DATA"


def find_data_root(root: Path, summary: dict, data: str | Path | None) -> Path | None:
    """The first candidate that exists (an explicit --data must exist)."""
    if data:
        return Path(data) if Path(data).exists() else None
    return next((p for p in data_root_candidates(root, summary, None) if p.exists()), None)


def _fresh(path: Path, ckpt: Path | None) -> bool:
    """path exists and was written after the checkpoint (so it shows this checkpoint)."""
    return path.is_file() and (ckpt is None or path.stat().st_mtime >= ckpt.stat().st_mtime)


def read_provenance(root: Path) -> dict[str, dict]:
    path = root / PROVENANCE_JSON
    return json.loads(path.read_text()) if path.is_file() else {}


def _note(root: Path, files: dict[str, dict]) -> None:
    prov = read_provenance(root)
    prov.update(files)
    (root / PROVENANCE_JSON).write_text(json.dumps(prov, indent=2) + "\n")


def label_source(data_root: Path, split: str) -> str | None:
    """Zero-shot ground truth next to the data: the shapes labels, or a COCO instances file."""
    ann = data_root / "annotations"
    if (ann / f"shapes_labels_{split}2014.json").is_file():
        return "shapes"
    inst = ann / f"instances_{split}2014.json"
    return str(inst) if inst.is_file() else None


def wanted(root: Path, ckpt: Path | None, split: str) -> list[str]:
    """Model pictures and files that are absent or older than the checkpoint."""
    files = {"metrics": f"metrics_{split}.json", "text_to_image": TEXT_TO_IMAGE_PNG,
             "image_to_text": IMAGE_TO_TEXT_PNG, "heatmap": HEATMAP_PNG, "zero_shot": f"zeroshot_{split}.json"}
    out = [k for k, f in files.items() if not _fresh(root / f, ckpt)]
    return out + ([] if (root / DATA_SAMPLES_PNG).is_file() else ["data_samples"])


def complete_run(run_dir: str | Path, data: str | Path | None = None, device: str = "auto",
                 seed: int = 0, progress: bool = False) -> Completion:
    """Draw what RUN lacks (see the module docstring); returns what was drawn and what is missing."""
    run = RunFiles(Path(run_dir))
    summary = json.loads(run.summary.read_text()) if run.summary.is_file() else {}
    cfg = json.loads(run.config.read_text()) if run.config.is_file() else {}
    # With a validation subset (data.val_images), the images outside it chose nothing: draw on those.
    d = cfg.get("data", {})
    done = Completion(checkpoint=checkpoint_of(run.root), split="val-heldout" if d.get("val_images") else "val")
    epochs = read_records(run.metrics, "epoch")
    if epochs and not run.curves.is_file():
        from ..eval.plots import plot_training_curves, run_batch_size
        plot_training_curves(epochs, run.curves, batch_size=run_batch_size(run.root))
        done.drawn.append(run.curves.name)
    todo = wanted(run.root, done.checkpoint, done.split)
    if not todo:
        return done
    done.data_root = find_data_root(run.root, summary, data)
    ckpt_name = done.checkpoint.name if done.checkpoint else "best.pt"
    if done.checkpoint is None or done.data_root is None:
        why = (f"no checkpoint (best.pt or last.pt) in {run.root}" if done.checkpoint is None else
               f"the data is not found (given: {data})" if data else
               f"the run's data is not found (summary.json: {summary.get('data_root', 'no data_root')})")
        done.missing = missing_commands(run.root, todo, why, "DATA", ckpt_name)
        return done
    try:
        _draw(run.root, done, todo, seed, device, progress)
    except _recoverable_errors() as e:
        log.warning("report: %s", e)
        left = [k for k in todo if k not in done.drawn]
        done.missing.update(missing_commands(run.root, left, str(e), str(done.data_root), ckpt_name))
    return done


def _recoverable_errors() -> tuple[type[BaseException], ...]:
    from ..config import ConfigError
    from ..data import DataError
    from ..model import ModelError
    from ..text import TextEncoderError
    return (ConfigError, DataError, ModelError, TextEncoderError, OSError)


def _draw(root: Path, done: Completion, todo: list[str], seed: int, device: str, progress: bool) -> None:
    """Embed the validation split once with the checkpoint, then draw every wanted item from it."""
    from ..data import DataError
    from ..eval.evaluate import checkpoint_embeddings, evaluate_checkpoint
    from ..model import read_checkpoint
    ckpt, data_root, split = done.checkpoint, done.data_root, done.split
    if "data_samples" in todo:
        _data_samples(root, data_root, seed)
        done.drawn.append(DATA_SAMPLES_PNG)
    if not set(todo) - {"data_samples"}:
        return
    try:
        emb, cfg = checkpoint_embeddings(ckpt, data_root, split, device=device, progress=progress)
    except DataError:
        if split != "val-heldout":
            raise
        log.info("report: no held-out validation image in %s; drawing on protocol val", data_root)
        split = done.split = "val"  # the subset is the whole split: the one that chose the checkpoint
        emb, cfg = checkpoint_embeddings(ckpt, data_root, split, device=device, progress=progress)
    epoch = read_checkpoint(ckpt).get("epoch")
    where = f"`{ckpt.name}` (epoch {epoch}) on the `{split}` split"
    if "metrics" in todo:
        evaluate_checkpoint(ckpt, data_root, split=split, cfg=cfg, embeddings=emb)
        done.drawn.append(f"metrics_{split}.json")
    drawn = _retrieval_pictures(root, emb, [k for k in todo if k in ("text_to_image", "image_to_text", "heatmap")],
                                seed, where)
    done.drawn += drawn
    if "zero_shot" in todo:
        source = label_source(data_root, cfg.data.val_split)
        if source is None and not (Path(data_root) / "annotations").is_dir():
            # A CSV/TSV/JSONL file, an image folder, a Flickr layout: no class labels clipft can read there
            # (the COCO-only advice named paths such as captions.csv/annotations/instances_val2014.json).
            done.missing["zero_shot"] = (
                f"{data_root} holds captions but no class labels (zero-shot over a dataset reads the shapes "
                "labels or a COCO instances file); classify your own images by class name with "
                f"`clipft zeroshot --checkpoint {ckpt} --image IMAGE ... --labels NAME ...`")
            return
        if source is None:
            done.missing["zero_shot"] = (
                f"no zero-shot labels next to the data ({data_root}/annotations has neither "
                f"shapes_labels_{cfg.data.val_split}2014.json nor instances_{cfg.data.val_split}2014.json): "
                f"`clipft zeroshot --checkpoint {ckpt} --data {data_root} --labels-from INSTANCES.json` fills it")
            return
        from ..eval.zeroshot import zeroshot_dataset
        r = zeroshot_dataset(ckpt, data_root, split=split, labels_from=source, cfg=cfg, device=device,
                             embeddings=emb, n_examples=6, seed=seed)
        done.drawn += [Path(r[k]).name for k in ("json", "examples_png", "confusion_png") if k in r]
        _note(root, {Path(r["examples_png"]).name: {"rule": f"6 seeded random labelled images (seed {seed})",
                                                   "from": where}} if "examples_png" in r else {})


def _retrieval_pictures(root: Path, emb, kinds: list[str], seed: int, where: str) -> list[str]:
    """The report's retrieval pictures: seeded random queries plus the best and worst by rank."""
    from ..eval import pictures as P
    from ..eval import plots as V
    picks = P.example_queries(emb, N_RANDOM, seed)
    then = "then the best and the worst remaining query by the rank of its ground truth"
    rules = {P.TEXT_TO_IMAGE_PNG: f"one random caption of each of {N_RANDOM} seeded random images (seed {seed}), "
                                  f"{then} (its own image)",
             P.IMAGE_TO_TEXT_PNG: f"{N_RANDOM} seeded random images (seed {seed}), {then} (its best own caption)",
             P.HEATMAP_PNG: f"{min(HEATMAP_IMAGES, emb.rows.numel())} seeded random images (seed {seed}) and all "
                            "their captions"}
    written = {}
    if "text_to_image" in kinds:
        rows = P.text_to_image_results(emb, picks=[j for j, _ in picks["captions"]])
        for r, (_, tag) in zip(rows, picks["captions"]):
            r["tag"] = tag
        written[P.TEXT_TO_IMAGE_PNG] = V.plot_text_to_image(rows, root / P.TEXT_TO_IMAGE_PNG)
    if "image_to_text" in kinds:
        rows = P.image_to_text_results(emb, rows=[r for r, _ in picks["images"]])
        for r, (_, tag) in zip(rows, picks["images"]):
            r["tag"] = tag
        written[P.IMAGE_TO_TEXT_PNG] = V.plot_image_to_text(rows, root / P.IMAGE_TO_TEXT_PNG)
    if "heatmap" in kinds:
        sim, labels, owner = P.heatmap_data(emb, HEATMAP_IMAGES, seed)
        written[P.HEATMAP_PNG] = V.plot_similarity_heatmap(sim, labels, owner, root / P.HEATMAP_PNG)
    _note(root, {name: {"rule": rules[name], "from": where} for name in written})
    return list(written)


def _data_samples(root: Path, data_root: Path, seed: int) -> None:
    from ..config import from_dict
    from ..data import load_split
    from ..eval.pictures import data_samples
    from ..eval.plots import plot_data_samples
    cfg = from_dict(json.loads((root / "config.json").read_text()))
    train = load_split(data_root, cfg.data.train_split, cfg.data)
    plot_data_samples(data_samples(train, 4, seed), root / DATA_SAMPLES_PNG,
                      title=f"4 random image-caption pairs of the training split ({train.name})")
    _note(root, {DATA_SAMPLES_PNG: {"rule": f"4 seeded random training images (seed {seed}) with all their "
                                            "captions", "from": f"the training split of {data_root}"}})


# What each wanted item fills in the report, and the command that makes it without the report.
_FILLS = {
    "metrics": ("Recall@K of the checkpoint", "clipft evaluate --checkpoint {ckpt} --data {data}"),
    "text_to_image": ("text -> image retrievals", "clipft visualize text-to-image --checkpoint {ckpt} --data {data}"),
    "image_to_text": ("image -> text retrievals", "clipft visualize image-to-text --checkpoint {ckpt} --data {data}"),
    "heatmap": ("similarity heatmap", "clipft visualize heatmap --checkpoint {ckpt} --data {data}"),
    "zero_shot": ("zero-shot classification",
                  "clipft zeroshot --checkpoint {ckpt} --data {data} --labels-from shapes|INSTANCES.json"),
    "data_samples": ("random training image-caption pairs",
                     "clipft inspect-data --data {data} --out {run}/data_samples.png"),
}


def missing_commands(root: Path, keys: list[str], why: str, data: str, ckpt_name: str) -> dict[str, str]:
    """key -> "what is missing: why; the command that fills it" for every item that could not be drawn."""
    ckpt = root / ckpt_name
    return {k: f"{_FILLS[k][0]}: {why}. `{_FILLS[k][1].format(ckpt=ckpt, data=data, run=root)}` fills it, or "
               f"`clipft report {root} --data {data}` draws everything missing" for k in keys if k in _FILLS}
