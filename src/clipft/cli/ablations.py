"""The named configurations of `clipft ablate` and their checks, as data: `ABLATIONS` (name -> overrides on
the base config, like `config.PRESETS`), a user's YAML file of more, and the selection a study runs.
Imports no torch, so that an unknown name or a bad file is refused before anything heavy loads; the
study itself is `ablate.py`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import yaml

from ..config import Config, ConfigError, update_from_dict


class AblationError(ConfigError):
    """A study that cannot run as asked (unknown configuration, a run directory made with another
    config, a bad configurations file). A ConfigError, so the CLI prints it as one line."""


# --------------------------------------------------------------------------- the modifications (data)

# name -> overrides on the base config. "baseline" is the base config itself.
ABLATIONS: dict[str, dict[str, dict[str, Any]]] = {
    "baseline": {},
    # projection head
    "batchnorm": {"model": {"head_norm": "batchnorm"}},
    "layernorm": {"model": {"head_norm": "layernorm"}},
    "dropout": {"model": {"head_dropout": 0.2}},
    "deep_head": {"model": {"head_layers": 3}},
    "residual_head": {"model": {"head_residual": True}},
    # pooling
    "attention_pool": {"model": {"pooling": "attention"}},
    # temperature
    "learnable_temp": {"model": {"learnable_temperature": True}},
    # data augmentation
    "crop_flip": {"data": {"augment": True, "flip": "swap"}},
    "crop_noflip": {"data": {"augment": True, "flip": "off"}},
    "color_jitter": {"data": {"color_jitter": 0.4}},
    # optimisation
    "no_warmup": {"train": {"warmup_steps": 0}},
    "backbone_lr": {"train": {"backbone_lr_ratio": 0.1}},
    "freeze_backbone": {"train": {"freeze_backbone_epochs": 2}},
    "last_stages": {"model": {"trainable_stages": 2}},
    "frozen_bn": {"model": {"freeze_bn_stats": True}},
    # the contrastive recipe (objectives.py; what the frozen, cached text tower makes cheap)
    "caption_bank": {"train": {"text_negatives": "1024"}},
    "image_queue": {"train": {"image_queue": 1024}},
    "siglip": {"train": {"loss": "siglip"}, "model": {"learnable_temperature": True}},
    "ema": {"train": {"ema": 0.999}},
    "clustered_batches": {"data": {"batch_sampler": "clustered"}},
}

ABLATION_NOTES: dict[str, str] = {
    "baseline": "the base config unchanged",
    "batchnorm": "BatchNorm1d after each hidden linear layer of the head",
    "layernorm": "LayerNorm after each hidden linear layer of the head",
    "dropout": "dropout p=0.2 after each hidden activation of the head",
    "deep_head": "3-layer head (F -> hidden -> hidden/2 -> D)",
    "residual_head": "residual head: MLP(x) + W x",
    "attention_pool": "CLIP-style QKV attention pooling over the final feature map instead of average pooling",
    "learnable_temp": "learnable temperature (log 1/tau, clamped to 1/tau <= max_logit_scale) instead of fixed",
    "crop_flip": "random resized crop + horizontal flip, left/right swapped in the caption of a flipped image",
    "crop_noflip": "random resized crop, no flip",
    "color_jitter": "brightness/contrast/saturation jitter 0.4 (no hue: captions name colours)",
    "no_warmup": "no learning-rate warmup (the base config warms up)",
    "backbone_lr": "backbone learning rate 0.1 x the head's",
    "freeze_backbone": "backbone frozen (no gradients, BatchNorm statistics fixed) for the first 2 epochs",
    "last_stages": "only the last 2 backbone stages (layer3, layer4) trainable",
    "frozen_bn": "backbone BatchNorm running statistics frozen (eval mode), affine weights trained",
    "caption_bank": "image->text softmax over the batch's captions plus 1024 drawn from the whole caption cache each step",
    "image_queue": "the last 1024 image embeddings are extra negatives of each caption (cross-batch memory)",
    "siglip": "SigLIP's sigmoid loss (learnable temperature and bias, t' = log 10, b = -10) instead of InfoNCE",
    "ema": "validation, best.pt and export use an EMA of the weights (decay 0.999, warm-up (1+t)/(10+t))",
    "clustered_batches": "batches drawn from k-means clusters of the caption embeddings (harder in-batch negatives)",
}

# --quick: baseline plus two modifications, on a small budget (a smoke check of the whole study).
QUICK_CONFIGS = ("baseline", "batchnorm", "learnable_temp")
QUICK_OVERRIDES: dict[str, dict[str, Any]] = {
    "data": {"train_images": 200, "val_images": 100, "image_size": 48},
    "train": {"epochs": 3, "batch_size": 50, "warmup_steps": 2},
}
# Synthetic shapes data generated when --data is not given: (train images, val images).
DEMO_DATA_SIZES = (2000, 500)
QUICK_DATA_SIZES = (200, 100)
# Keys that do not change what a run computes: a saved run may differ in them and still count.


def describe(overrides: dict[str, dict[str, Any]]) -> str:
    """`section.key=value` list of an overrides mapping ("(none)" for the baseline)."""
    items = [f"{s}.{k}={json.dumps(v) if not isinstance(v, str) else v}"
             for s, kv in overrides.items() for k, v in (kv or {}).items()]
    return " ".join(items) if items else "(none)"


def load_ablations_file(path: str | Path) -> dict[str, dict[str, dict[str, Any]]]:
    """User configurations from YAML: `name: {section: {key: value}}` (the ABLATIONS format).

    Every entry is checked against the config schema here, before any run starts."""
    path = Path(path)
    if not path.is_file():
        raise AblationError(f"{path}: configurations file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise AblationError(f"{path}: not valid YAML ({e.__class__.__name__})") from None
    if not isinstance(data, dict) or not data:
        raise AblationError(f"{path}: expected a mapping of configuration name -> overrides "
                            "(e.g. 'wide_head: {model: {head_hidden: 2048}}')")
    out = {}
    for name, overrides in data.items():
        if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
            raise AblationError(f"{path}: {name!r} is not a usable configuration name")
        if name in ABLATIONS:
            raise AblationError(f"{path}: {name!r} is a built-in configuration (clipft ablate --list); rename it")
        overrides = overrides or {}
        update_from_dict(Config(), overrides, source=f"{path}: {name}")  # schema check
        out[name] = overrides
    return out


def select_configs(names: Sequence[str] | None, user: dict[str, dict] | None = None,
                   quick: bool = False) -> dict[str, dict[str, dict[str, Any]]]:
    """name -> overrides for the study, baseline first (added if missing: every change is
    measured against it). names=None: QUICK_CONFIGS with quick, else every built-in and user one."""
    user = user or {}
    known = {**ABLATIONS, **user}
    if names is None:
        names = list(QUICK_CONFIGS) if quick else list(known)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise AblationError(f"unknown configuration(s) {', '.join(map(repr, unknown))} "
                            f"(known: {', '.join(known)}; user-defined ones come from --configs-file)")
    ordered = ["baseline"] + [n for n in dict.fromkeys(names) if n != "baseline"]
    return {n: known[n] for n in ordered}


def format_list(user: dict[str, dict] | None = None) -> str:
    """What `clipft ablate --list` prints: every configuration with its note and overrides."""
    lines = ["built-in configurations (quick: " + " ".join(QUICK_CONFIGS) + "):"]
    width = max(len(n) for n in [*ABLATIONS, *(user or {})])
    for name, o in ABLATIONS.items():
        lines.append(f"  {name:<{width}}  {ABLATION_NOTES.get(name, '')}")
        lines.append(f"  {'':<{width}}    {describe(o)}")
    if user:
        lines.append("from --configs-file:")
        for name, o in user.items():
            lines.append(f"  {name:<{width}}  {describe(o)}")
    return "\n".join(lines)
