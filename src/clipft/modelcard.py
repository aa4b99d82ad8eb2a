"""The model card (README.md) of an export folder, generated from the checkpoint and its run directory.

YAML front matter the Hugging Face hub reads (library, tags, datasets, metrics), then: what the
model is and how to use it, the training data, the hyperparameters, Recall@K with each protocol
named and the split that chose the checkpoint, zero-shot results where they were measured, and
intended use and limits. Every figure comes from the run's own files; what was not measured is
said to be not measured, never left as a blank to fill in.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

DIRECTIONS = (("image_to_text", "image -> text"), ("text_to_image", "text -> image"))


def _load_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _same_checkpoint(recorded: Any, ckpt_path: Path) -> bool:
    return bool(recorded) and Path(str(recorded)).name == ckpt_path.name and (
        Path(str(recorded)).resolve().parent == ckpt_path.resolve().parent)


def _recall_table(metrics: dict) -> list[str]:
    ks = list(metrics["image_to_text"])
    lines = ["| direction | " + " | ".join(ks) + " |", "|---|" + "---:|" * len(ks)]
    for key, label in DIRECTIONS:
        lines.append(f"| {label} | " + " | ".join(f"{metrics[key][k]:.2f}" for k in ks) + " |")
    return lines


def _epoch_record(run: Path, epoch: Any) -> dict:
    """The metrics.jsonl epoch record of `epoch` (its validation recall), or {}."""
    path = run / "metrics.jsonl"
    if not path.is_file():
        return {}
    for line in path.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            if rec.get("type") == "epoch" and rec.get("epoch") == epoch and "val" in rec:
                return rec
    return {}


def dataset_id(cfg: dict, summary: dict) -> str:
    """The `datasets:` entry: coco for MS COCO, else the dataset's folder or file name."""
    source = str(summary.get("dataset", {}).get("source", ""))
    root = Path(summary.get("data_root", "") or "data")
    if (root / "annotations" / "shapes_labels_val2014.json").is_file() \
            or (root / "annotations" / "shapes_labels_train2014.json").is_file():
        return "clipft-synthetic-shapes"
    if source.startswith("coco:") or cfg["data"].get("format") == "coco":
        return "coco"
    return root.stem or "custom"


def front_matter(cfg: dict, config: dict, summary: dict) -> list[str]:
    tags = ["clipft", "clip", "image-text-retrieval", "zero-shot-image-classification", "image-feature-extraction",
            config["backbone"]]
    lines = ["---", "library_name: clipft", "pipeline_tag: image-feature-extraction", "tags:"]
    lines += [f"- {t}" for t in tags]
    lines += ["datasets:", f"- {dataset_id(cfg, summary)}", "metrics:", "- recall"]
    if config.get("files", {}).get("onnx"):
        lines += ["onnx: true"]
    return lines + ["---", ""]


def _setup_rows(ckpt: dict, cfg: dict, config: dict, summary: dict) -> list[tuple[str, str]]:
    m, t, d, x = cfg["model"], cfg["train"], cfg["data"], cfg["text"]
    h = config["head"]
    head = f"{h['layers']}-layer MLP, hidden {h['hidden_size']}, norm {h['norm']}, dropout {h['dropout']}" \
           + (", residual linear shortcut" if h["residual"] else "")
    from .backbones import describe_backbone, describe_weights
    rows = [("image backbone", f"{describe_backbone(m['backbone'])} (initialised from: {describe_weights(m)}), "
                               f"{m['pooling']} pooling"),
            ("projection head", f"{head} -> {config['embed_dim']}-d, L2-normalised"),
            ("text encoder (frozen, never trained)", f"`{x['encoder']}` (max {x['max_length']} tokens)"),
            ("loss", f"symmetric InfoNCE, temperature {m['temperature']} "
                     f"({'learnable, now ' + format(config['temperature'], '.4f') if m['learnable_temperature'] else 'fixed'})"),
            ("optimizer", f"AdamW, lr {t['lr']} (backbone x {t['backbone_lr_ratio']}), weight decay "
                          f"{t['weight_decay']}, cosine schedule with {t['warmup_steps']} warmup steps, "
                          f"grad clip {t['grad_clip']}"),
            ("epochs x batch size", f"{t['epochs']} x {t['batch_size']} (seed {t['seed']}); this checkpoint: epoch "
                                    f"{ckpt.get('epoch')}"),
            ("images", f"{d['image_size']} px, mean {list(d['mean'])}, std {list(d['std'])}; augmentation "
                       f"{'on' if d.get('augment') else 'off'}")]
    hw = summary.get("hardware", {})
    if hw and "train_seconds" in summary:
        dev = hw.get("gpu") or f"{hw.get('cpu')} ({hw.get('cpu_count')} cores)"
        rows.append(("training hardware and time", f"{hw.get('device')}: {dev}, {summary['train_seconds'] / 60:.1f} min"))
    return rows


_SOURCE_PATH = re.compile(r"\b(coco|csv|jsonl|folder):([^:()\s]*[/\\][^:()\s]*)")


def _public_source(text: str) -> str:
    """'coco:/home/me/data/coco2014:val' -> 'coco:coco2014:val', also inside a protocol line: a card
    is published, the trainer's local folders are not."""
    return _SOURCE_PATH.sub(lambda m: f"{m.group(1)}:{Path(m.group(2)).name}", str(text))


def data_section(cfg: dict, summary: dict) -> list[str]:
    ds = summary.get("dataset")
    lines = ["## Training data", ""]
    if ds:
        lines.append(f"{ds['train_images']} training images ({ds['train_captions']} captions) from "
                     f"`{_public_source(ds['source'])}`; validation: {ds['val_images']} images ({ds['val_captions']} "
                     f"captions) from `{_public_source(ds['val_source'])}`.")
    else:
        d = cfg["data"]
        lines.append(f"The `{d['train_split']}` split of the training data (format {d.get('format', 'auto')}, "
                     f"{d['train_images'] or 'all'} images); the run directory holds no summary with exact sizes.")
    lines.append("Captions were embedded once by the frozen text encoder and cached; only the image tower learned.")
    return lines + [""]


def evaluation_section(ckpt: dict, ckpt_path: Path, cfg: dict) -> list[str]:
    run = ckpt_path.parent
    val = cfg["data"]["val_split"]
    best = ckpt.get("best_epoch")
    chosen = (f"This checkpoint is `{ckpt_path.name}`: epoch {ckpt.get('epoch')}. "
              + (f"It is the epoch with the best mean R@5 (both directions) on the `{val}` split, evaluated "
                 "after every epoch: that split chose it, so its figures on `val` are optimistic."
                 if ckpt.get("epoch") == best else
                 f"The best epoch by mean R@5 on `{val}` was {best}; this checkpoint was not chosen on validation."))
    lines = ["## Evaluation", "", chosen, "",
             "Recall@K (%), COCO protocol: every image is a query against all captions of the split (a hit if "
             "any of its own captions ranks in the top K) and every caption a query against all images. Figures "
             "are comparable only under the same protocol; published COCO numbers use the Karpathy 5k test "
             "split (`clipft evaluate --split karpathy-test`).", ""]
    found = 0
    for f in sorted(run.glob("metrics_*.json")):
        m = _load_json(f)
        if "image_to_text" in m and _same_checkpoint(m.get("checkpoint"), ckpt_path):
            lines += [f"### `{m.get('split', f.stem[8:])}`", "", f"Protocol: {_public_source(m.get('protocol', 'not recorded'))}.",
                      ""] + _recall_table(m) + [""]
            found += 1
    rec = _epoch_record(run, ckpt.get("epoch"))
    if rec:
        v = rec["val"]
        lines += [f"### `{val}` during training (epoch {rec['epoch']})", "",
                  f"Protocol: the training-time validation split, {v['num_images']} images x {v['num_captions']} "
                  "captions, all captions per image.", ""] + _recall_table(v) + [""]
        found += 1
    if not found:
        lines += ["No Recall@K was recorded for this checkpoint (no validation during training, no "
                  "`clipft evaluate` output beside it).", ""]
    return lines + zero_shot_section(run, ckpt_path)


def zero_shot_section(run: Path, ckpt_path: Path) -> list[str]:
    lines = ["## Zero-shot classification", ""]
    rows = []
    for f in sorted(run.glob("zeroshot_*.json")):
        z = _load_json(f)
        if "top1" in z and _same_checkpoint(z.get("checkpoint"), ckpt_path):
            rows.append(f"| `{z.get('split')}` | {z.get('rule')} | {len(z.get('classes', []))} | {z['num_images']} | "
                        f"{z['top1']:.2f} | {z['top5']:.2f} | {z['chance_top1']:.2f} |")
    if not rows:
        return lines + ["Not measured for this checkpoint.", ""]
    return lines + ["| split | ground truth | classes | images | top-1 % | top-5 % | chance top-1 % |",
                    "|---|---|---:|---:|---:|---:|---:|"] + rows + [""]


def usage_section(config: dict, name: str) -> list[str]:
    lines = ["## How to use", "", "```python", "import clipft", "",
             f'model = clipft.load("{name}")  # this folder', 'images = model.encode_images(["photo.jpg"])  # [N, '
             f'{config["embed_dim"]}], L2-normalised', 'texts = model.encode_texts(["a dog on a beach"])',
             "scores = model.similarity(texts, images)", "```", "",
             f"`encode_texts` loads the frozen text encoder `{config['text_encoder']['name']}` this tower was "
             f"trained against. Images: RGB, the centre square resized to {config['image_size']} px (bicubic), "
             f"scaled to [0, 1], normalised with mean {config['mean']} and std {config['std']}.", ""]
    if config.get("files", {}).get("onnx"):
        lines += [f"`image_tower.onnx`: input `pixel_values` float32 [B, 3, {config['image_size']}, "
                  f"{config['image_size']}] (already normalised), output `image_embeds` [B, {config['embed_dim']}] "
                  f"(L2-normalised); B is dynamic. Checked against PyTorch with onnxruntime on real images: max "
                  f"abs difference {config['onnx']['max_abs_diff']:.1e}.", ""]
    return lines + loading_section(config, name)


def loading_section(config: dict, name: str = "DIR") -> list[str]:
    """Every way to load this folder, each with the parity measured when it was exported."""
    files = config.get("files", {})
    rows = [("clipft (PyTorch)", '`clipft.load("DIR")`', "the reference: the checkpoint's tower and text encoder")]
    if files.get("onnx"):
        rows.append(("ONNX (onnxruntime)", '`clipft.load("DIR", backend="onnx")`',
                     f"image embeddings within {config['onnx']['max_abs_diff']:.1e} (max abs) of PyTorch"))
    q = config.get("onnx_int8")
    if files.get("onnx_int8") and q:
        rows.append(("int8 ONNX", '`clipft.load("DIR", backend="onnx", quantized=True)`, '
                     "`clipft index FOLDER --model DIR/image_tower.int8.onnx`",
                     f"mean cosine {q['mean_cosine']:.4f} (min {q['min_cosine']:.4f}) to the float tower, mean R@5 "
                     f"change {0.0 - q['mean_r5_drop'] + 0.0:+.1f} points on {q['measured_images']} validation images; {q['speedup']:.2f}x the float "
                     f"file's speed, {q['bytes_int8'] / max(1, q['bytes_float']):.0%} of its size"))
    oc = config.get("open_clip") or {}
    if oc.get("written"):
        rows.append(("open_clip", '`open_clip.create_model_and_transforms("local-dir:DIR")`, '
                     '`open_clip.get_tokenizer("local-dir:DIR")`',
                     f"encode_image within {oc['image_max_abs_diff']:.1e} and encode_text within "
                     f"{oc['text_max_abs_diff']:.1e} (max abs, normalised) of clipft; the same logit scale"))
        rows.append(("CLIP_benchmark", "`clip_benchmark eval --model_type open_clip --model local-dir:DIR "
                     "--dataset mscoco_captions --dataset_root COCO --task zeroshot_retrieval --recall_k 1 5 10 "
                     "--no_amp`", "loads through open_clip as above, so the same parity; its retrieval recall "
                     "equals `clipft evaluate --set train.amp=off` on the same images and captions"))
    rows = [(a, b.replace("DIR", name), c) for a, b, c in rows]  # DIR: this folder, under its own name
    lines = ["## Ways to load this folder", "", "| way | how | measured parity |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    if not oc.get("written") and oc.get("reason"):
        lines += ["", f"No open_clip form: {oc['reason']}."]
    return lines + [""]


def limits_section(cfg: dict, dataset: str) -> list[str]:
    return ["## Intended use and limits", "",
            f"- Intended for text-to-image and image-to-text retrieval and zero-shot classification of images "
            f"like the training data (`{dataset}`), with the text encoder named above; the embeddings mean "
            "nothing next to another text encoder's.",
            f"- Trained at {cfg['data']['image_size']} px on the images described above only: expect lower "
            "recall on other domains, and check on your own data before relying on it.",
            "- The frozen text encoder brings its own biases and its language (captions were English); the "
            "image tower learned whatever correlations the captions hold.",
            "- Not for identifying people, for surveillance, or for decisions about individuals.", ""]


def model_card(ckpt: dict, ckpt_path: Path, config: dict, name: str) -> str:
    """The card's Markdown text (see the module docstring)."""
    cfg = ckpt["config"]
    summary = _load_json(ckpt_path.parent / "summary.json")
    lines = front_matter(cfg, config, summary)
    lines += [f"# {name}", "",
              f"An image encoder fine-tuned with clipft: a torchvision {config['backbone']} and a projection head "
              f"whose L2-normalised {config['embed_dim']}-d embeddings live in the space of the frozen text "
              f"encoder `{cfg['text']['encoder']}`, so text and images can be compared by cosine similarity.", ""]
    lines += usage_section(config, name) + data_section(cfg, summary)
    lines += ["## Training procedure", "", "| setting | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in _setup_rows(ckpt, cfg, config, summary)] + [""]
    lines += evaluation_section(ckpt, ckpt_path, cfg)
    lines += limits_section(cfg, dataset_id(cfg, summary))
    lines += [f"Exported by clipft {config['clipft_version']} from `{ckpt_path.name}`.", ""]
    return "\n".join(lines)


def write_model_card(path: Path, ckpt: dict, ckpt_path: Path, config: dict, name: str) -> Path:
    Path(path).write_text(model_card(ckpt, ckpt_path, config, name))
    return Path(path)
