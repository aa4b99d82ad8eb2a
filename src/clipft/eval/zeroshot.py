"""Zero-shot classification with the fine-tuned image tower and the frozen text encoder.

A class is described by prompts ("a photo of a {}." ...); its embedding is the L2-normalised mean
of its prompt embeddings (CLIP's prompt ensembling). An image's class probabilities are
softmax(logit_scale * cos(image, class)), with the checkpoint's own 1/tau.

Ground truth on a labelled dataset (`--labels-from`):
  shapes[:FIELD]   the shapes dataset's own labels (annotations/shapes_labels_<split>2014.json).
                   Images hold 1-3 objects, so the label is the image's LARGEST object: its only
                   object, or its only "large" one; images where two or more objects share the
                   largest size have no single answer and are left out (and counted).
                   FIELD: color-shape (default, 40 classes such as "red circle"), shape (5), color (8).
  PATH.json        a COCO instances file (instances_val2014.json): the category of the image's
                   largest annotation (by area); classes are all its categories.
With --labels, the classes are those names instead, and images whose label is not among them are
left out.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from ..inference import fill_template
from ..config import ConfigError
from ..data import DataError, read_json
from .protocols import VAL_PROTOCOLS

log = logging.getLogger(__name__)

SHAPES_FIELDS = ("color-shape", "shape", "color")


# --------------------------------------------------------------------------- prompts and classes


def class_prompts(labels: Sequence[str], templates: Sequence[str]) -> list[list[str]]:
    """[C][T] prompts: every template filled with every class name."""
    if not labels:
        raise ConfigError("zero-shot needs at least one class label")
    if not templates:
        raise ConfigError("zero-shot needs at least one prompt template")
    return [[fill_template(t, lab) for t in templates] for lab in labels]


def class_embeddings(encoder, labels: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    """[C, D] class embeddings: mean of each class's L2-normalised prompt embeddings, renormalised.
    `encoder` is a clipft.text.TextEncoder (anything with encode(list[str]) -> [M, D])."""
    prompts = class_prompts(labels, templates)
    t = len(templates)
    emb = encoder.encode([p for group in prompts for p in group])  # [C*T, D], L2-normalised
    emb = emb.reshape(len(labels), t, -1).mean(1)  # [C, D]
    return F.normalize(emb, dim=-1)


def class_probabilities(image_emb: torch.Tensor, class_emb: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """softmax over classes of logit_scale * cos: image_emb [N, D], class_emb [C, D] -> [N, C]."""
    return (logit_scale * image_emb @ class_emb.T).softmax(dim=-1)


def top_k(probs: torch.Tensor, labels: Sequence[str], k: int = 5) -> list[list[tuple[str, float]]]:
    """Per image, the k most probable (label, probability) pairs, best first."""
    k = min(k, probs.shape[1])
    p, idx = probs.topk(k, dim=-1)
    return [[(labels[j], float(v)) for v, j in zip(pr.tolist(), ix.tolist())] for pr, ix in zip(p, idx)]


# --------------------------------------------------------------------------- ground truth

@dataclass
class LabelSet:
    """Ground-truth classes of a labelled dataset."""
    classes: list[str]
    targets: dict[int, int]  # image id -> index into classes
    source: str  # where the labels came from (file)
    rule: str  # how an image's label is chosen, in words (goes into the report)
    unlabelled: list[int] = field(default_factory=list)  # image ids without one unambiguous label

    def restrict(self, labels: Sequence[str]) -> "LabelSet":
        """Keep the classes named in `labels` (in that order); other images become unlabelled."""
        index = {c: i for i, c in enumerate(labels)}
        targets, dropped = {}, list(self.unlabelled)
        for image_id, t in self.targets.items():
            name = self.classes[t]
            if name in index:
                targets[image_id] = index[name]
            else:
                dropped.append(image_id)
        return LabelSet(list(labels), targets, self.source, self.rule + "; classes restricted to --labels", dropped)


def _shape_label(obj: dict, field_name: str) -> str:
    if field_name == "shape":
        return obj["shape"]
    if field_name == "color":
        return obj["color"]
    return f"{obj['color']} {obj['shape']}"


def largest_object(objects: list[dict]) -> dict | None:
    """The image's only object, or its only "large" one; None when the largest size is shared."""
    if len(objects) == 1:
        return objects[0]
    large = [o for o in objects if o.get("size") == "large"]
    return large[0] if len(large) == 1 else None


def shapes_label_set(root: str | Path, split: str, field_name: str = "color-shape") -> LabelSet:
    """Labels of the synthetic shapes dataset (see the module docstring for the rule)."""
    from ..data.shapes import COLORS, SHAPES
    if field_name not in SHAPES_FIELDS:
        raise DataError(f"--labels-from shapes:{field_name}: unknown field (known: {', '.join(SHAPES_FIELDS)})")
    path = Path(root) / "annotations" / f"shapes_labels_{split}2014.json"
    if not path.is_file():
        raise DataError(f"{path}: not found: --labels-from shapes uses the labels clipft make-data shapes writes, "
                        "so it works on the shapes dataset only; for COCO give --labels-from "
                        "annotations/instances_<split>2014.json")
    raw = read_json(path)
    if not isinstance(raw, dict):
        raise DataError(f"{path}: expected an object {{image id: [objects]}}")
    if field_name == "shape":
        classes = list(SHAPES)
    elif field_name == "color":
        classes = list(COLORS)
    else:
        classes = [f"{c} {s}" for c in COLORS for s in SHAPES]
    index = {c: i for i, c in enumerate(classes)}
    targets, unlabelled = {}, []
    for key, objects in raw.items():
        try:
            image_id = int(key)
            obj = largest_object(objects)
            label = None if obj is None else _shape_label(obj, field_name)
        except (ValueError, TypeError, KeyError, AttributeError):
            raise DataError(f"{path}: entry {key!r} is not a list of objects with shape/color/size") from None
        if label is None:
            unlabelled.append(image_id)
        elif label not in index:
            raise DataError(f"{path}: image {key}: unknown label {label!r}")
        else:
            targets[image_id] = index[label]
    rule = (f"shapes {field_name} of each image's largest object (its only object, or its only large one); "
            "images whose largest size is shared are left out")
    return LabelSet(classes, targets, str(path), rule, unlabelled)


def coco_instances_label_set(path: str | Path) -> LabelSet:
    """Labels from a COCO instances file: the category of each image's largest annotation."""
    path = Path(path)
    raw = read_json(path)
    if not isinstance(raw, dict) or not isinstance(raw.get("categories"), list) \
            or not isinstance(raw.get("annotations"), list):
        raise DataError(f"{path}: expected a COCO instances file with 'categories' and 'annotations' lists")
    cats = {}
    for k, c in enumerate(raw["categories"]):
        if not isinstance(c, dict) or not isinstance(c.get("id"), int) or not isinstance(c.get("name"), str):
            raise DataError(f"{path}: categories[{k}] needs an integer 'id' and a string 'name'")
        cats[c["id"]] = c["name"]
    classes = [cats[i] for i in sorted(cats)]
    index = {cid: classes.index(name) for cid, name in cats.items()}
    best: dict[int, tuple[float, int]] = {}
    for k, a in enumerate(raw["annotations"]):
        try:
            image_id, cid = int(a["image_id"]), int(a["category_id"])
            area = float(a["area"]) if "area" in a else float(a["bbox"][2]) * float(a["bbox"][3])
        except (KeyError, TypeError, ValueError, IndexError):
            raise DataError(f"{path}: annotations[{k}] needs image_id, category_id and area (or bbox)") from None
        if cid not in index:
            raise DataError(f"{path}: annotations[{k}]: category_id {cid} is not in 'categories'")
        if image_id not in best or area > best[image_id][0]:
            best[image_id] = (area, index[cid])
    targets = {i: c for i, (_a, c) in best.items()}
    ids = [im["id"] for im in raw.get("images", []) if isinstance(im, dict) and "id" in im]
    unlabelled = [i for i in ids if i not in targets]
    return LabelSet(classes, targets, str(path), "COCO category of each image's largest annotation (by area)",
                    unlabelled)


def load_label_set(spec: str, data_root: str | Path, split: str) -> LabelSet:
    """`--labels-from` value -> LabelSet: "shapes", "shapes:FIELD", or a COCO instances JSON path."""
    if spec == "shapes" or spec.startswith("shapes:"):
        return shapes_label_set(data_root, split, spec.split(":", 1)[1] if ":" in spec else "color-shape")
    return coco_instances_label_set(spec)


# --------------------------------------------------------------------------- scoring

def accuracy_at_k(probs: torch.Tensor, targets: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """{"top1": %, "top5": %}: percent of images whose true class is among the k most probable."""
    out = {}
    for k in ks:
        kk = min(k, probs.shape[1])
        hit = (probs.topk(kk, dim=-1).indices == targets[:, None]).any(-1)
        out[f"top{k}"] = 100.0 * float(hit.float().mean()) if targets.numel() else 0.0
    return out


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[C, C] counts: row = true class, column = predicted class."""
    cm = torch.zeros(num_classes * num_classes, dtype=torch.long)
    cm.index_add_(0, target * num_classes + pred, torch.ones_like(target))
    return cm.reshape(num_classes, num_classes)


# --------------------------------------------------------------------------- entry points

def _text_encoder(cfg, device):
    from ..text import load_text_encoder
    return load_text_encoder(cfg.text.encoder, device=device, max_length=cfg.text.max_length, amp=cfg.train.amp)


def zeroshot_dataset(checkpoint: str | Path, data_root: str | Path, split: str = "val", labels_from: str = "shapes",
                     labels: Sequence[str] | None = None, templates: Sequence[str] | None = None, cfg=None,
                     device: str = "auto", out_dir: str | Path | None = None, karpathy: str | Path | None = None,
                     embeddings=None, n_examples: int = 6, seed: int = 0, progress: bool = False) -> dict:
    """Top-1/top-5 zero-shot accuracy of a checkpoint on a labelled split; writes (in `out_dir`,
    default the checkpoint's directory) zeroshot_<split>.json, zeroshot_<split>_confusion.png and
    zeroshot_<split>_examples.png (images beside their class-probability bars). Returns the result.
    Pass `embeddings` (evaluate.SplitEmbeddings) to reuse image embeddings already computed."""
    from .evaluate import checkpoint_embeddings
    from ..runtime import resolve_device
    from .plots import plot_confusion_matrix, plot_zero_shot

    checkpoint = Path(checkpoint)
    if embeddings is None:
        embeddings, cfg = checkpoint_embeddings(checkpoint, data_root, split, cfg, device, karpathy,
                                                progress=progress, with_text=False)
    elif cfg is None:
        from ..config import from_dict
        from ..model import read_checkpoint
        cfg = from_dict(read_checkpoint(checkpoint)["config"])
    split_name = embeddings.split.name
    # The shapes labels file is named by the dataset's split (val for both val protocols).
    labelset = load_label_set(labels_from, data_root,
                              cfg.data.val_split if split_name in VAL_PROTOCOLS else split_name)
    if labels:
        labelset = labelset.restrict(labels)
    templates = list(templates or cfg.eval.zeroshot_templates)
    dev = resolve_device(device if device != "auto" else cfg.train.device)
    class_emb = class_embeddings(_text_encoder(cfg, dev), labelset.classes, templates)  # [C, D]

    image_ids = [embeddings.data.images[int(r)].image_id for r in embeddings.rows]
    sel = [j for j, i in enumerate(image_ids) if i in labelset.targets]  # rows with a ground truth
    if not sel:
        raise DataError(f"{labelset.source}: none of the {len(image_ids)} images of split {split_name!r} has a "
                        "usable label")
    emb = embeddings.image_emb[sel]  # [N_l, D]
    target = torch.tensor([labelset.targets[image_ids[j]] for j in sel])  # [N_l]
    probs = class_probabilities(emb, class_emb, embeddings.logit_scale)  # [N_l, C]
    pred = probs.argmax(-1)
    acc = accuracy_at_k(probs, target)
    cm = confusion_matrix(pred, target, len(labelset.classes))
    per_class = {c: {"n": int(cm[i].sum()), "top1": (100.0 * int(cm[i, i]) / int(cm[i].sum())) if cm[i].sum() else None}
                 for i, c in enumerate(labelset.classes)}
    out_dir = Path(out_dir) if out_dir else checkpoint.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"zeroshot_{split_name}"
    result = {
        "split": split_name, "protocol": embeddings.split.protocol, "checkpoint": str(checkpoint),
        "text_encoder": cfg.text.encoder, "label_source": labelset.source, "labels_from": labels_from,
        "rule": labelset.rule, "classes": labelset.classes, "templates": templates,
        "logit_scale": embeddings.logit_scale, "num_images": len(sel),
        "unlabelled_images": len(image_ids) - len(sel), **acc,
        "chance_top1": 100.0 / len(labelset.classes), "chance_top5": 100.0 * min(5, len(labelset.classes)) / len(labelset.classes),
        "per_class": per_class, "confusion": cm.tolist(),
    }
    result["confusion_png"] = str(plot_confusion_matrix(
        cm, labelset.classes, out_dir / f"{stem}_confusion.png",
        title=f"Zero-shot confusion ({split_name}, {len(sel)} images, top-1 {acc['top1']:.1f}%)"))
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(sel), generator=g)[:n_examples].tolist()
    items = [{"path": embeddings.data.images[int(embeddings.rows[sel[j]])].path,
              "probs": probs[j], "target": int(target[j])} for j in pick]
    if items:
        result["examples_png"] = str(plot_zero_shot(items, labelset.classes, out_dir / f"{stem}_examples.png"))
    (out_dir / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    result["json"] = str(out_dir / f"{stem}.json")
    return result


def zeroshot_images(checkpoint: str | Path, images: Sequence[str | Path], labels: Sequence[str],
                    templates: Sequence[str] | None = None, device: str = "auto", k: int = 5,
                    plot: str | Path | None = None) -> list[dict]:
    """Classify individual image files: [{"path", "top": [(label, p), ...]}] (k best, best first);
    unreadable files raise DataError. With `plot`, writes the image-beside-bars picture there."""
    from ..config import from_dict
    from ..data import build_transform, load_image
    from ..model import read_checkpoint, tower_from_checkpoint
    from ..runtime import resolve_device

    ckpt = read_checkpoint(checkpoint)
    cfg = from_dict(ckpt["config"])
    model = tower_from_checkpoint(ckpt)
    del ckpt
    dev = resolve_device(device if device != "auto" else cfg.train.device)
    model = model.to(dev)
    tf = build_transform(cfg.data.image_size, cfg.data.mean, cfg.data.std, train=False)
    batch = []
    for p in images:
        img, reason = load_image(p, cfg.data.image_size)
        if img is None:
            raise DataError(f"{p}: cannot use this image ({reason})")
        batch.append(tf(img))
    with torch.inference_mode():
        emb = model(torch.stack(batch).to(dev)).float().cpu()  # [N, D]
    templates = list(templates or cfg.eval.zeroshot_templates)
    class_emb = class_embeddings(_text_encoder(cfg, dev), list(labels), templates)
    probs = class_probabilities(emb, class_emb, float(model.logit_scale.exp()))
    results = [{"path": str(p), "top": top} for p, top in zip(images, top_k(probs, list(labels), k))]
    if plot:
        from .plots import plot_zero_shot
        plot_zero_shot([{"path": Path(p), "probs": pr, "target": None} for p, pr in zip(images, probs)],
                       list(labels), plot)
    return results
