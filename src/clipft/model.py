"""The trainable image tower: torchvision ResNet backbone + MLP projection head + logit scale.

The tower is self-contained (config + state dict rebuild it), so an exported checkpoint can be
loaded for inference without the trainer or the text side: `load_image_tower(path)`.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from .config import ModelConfig

# name -> (constructor, ImageNet weights enum member name, pooled feature width)
BACKBONES = {
    "resnet18": ("resnet18", "ResNet18_Weights", "IMAGENET1K_V1", 512),
    "resnet34": ("resnet34", "ResNet34_Weights", "IMAGENET1K_V1", 512),
    "resnet50": ("resnet50", "ResNet50_Weights", "IMAGENET1K_V2", 2048),
    "resnet101": ("resnet101", "ResNet101_Weights", "IMAGENET1K_V2", 2048),
}


class ModelError(RuntimeError):
    """A model that cannot be built or loaded (unknown backbone, weights unavailable offline)."""


def imagenet_weights(backbone: str):
    """The torchvision weights enum member used for `image_weights=imagenet`."""
    _, enum_name, member, _ = BACKBONES[backbone]
    return getattr(getattr(torchvision.models, enum_name), member)


def build_backbone(name: str, weights: str) -> tuple[nn.Module, int]:
    """A torchvision ResNet with its classifier removed; returns (module, pooled feature dim)."""
    if name not in BACKBONES:
        raise ModelError(f"unknown backbone {name!r} (choose from {', '.join(BACKBONES)})")
    if weights not in ("imagenet", "none"):
        raise ModelError(f"model.image_weights must be 'imagenet' or 'none', got {weights!r}")
    ctor_name, _, _, feat_dim = BACKBONES[name]
    w = imagenet_weights(name) if weights == "imagenet" else None
    try:
        net = getattr(torchvision.models, ctor_name)(weights=w)
    except (OSError, RuntimeError) as e:  # URLError is an OSError: no network, no cached file
        cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(w.url).name
        raise ModelError(
            f"could not load {name} ImageNet weights ({w}): {e.__class__.__name__}. Without network, "
            f"place the file at {cache} or use --set model.image_weights=none") from None
    net.fc = nn.Identity()  # [B, 3, H, W] -> [B, feat_dim] (global average pool kept)
    return net, feat_dim


class ProjectionHead(nn.Module):
    """Linear(in, hidden) -> GELU -> Linear(hidden, out)."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ImageTower(nn.Module):
    """images [B, 3, H, W] -> L2-normalised embeddings [B, D] in the text encoder's space."""

    def __init__(self, cfg: ModelConfig, embed_dim: int):
        super().__init__()
        self.cfg = cfg
        self.embed_dim = embed_dim
        self.backbone, feat_dim = build_backbone(cfg.backbone, cfg.image_weights)
        self.head = ProjectionHead(feat_dim, cfg.head_hidden, embed_dim)
        # Stored as log(1/tau) like CLIP; trainable only when learnable_temperature. The training
        # step clamps it so 1/tau <= max_logit_scale.
        init = math.log(1.0 / cfg.temperature)
        self.logit_scale = nn.Parameter(torch.tensor(init), requires_grad=cfg.learnable_temperature)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        feats = self.backbone(images)  # [B, F]
        return F.normalize(self.head(feats).float(), dim=-1)  # [B, D], fp32 even under autocast

    def clamp_logit_scale_(self) -> None:
        """Keep 1/tau in [1, max_logit_scale] (CLIP's clamp, stops the temperature collapsing)."""
        with torch.no_grad():
            self.logit_scale.clamp_(0.0, math.log(self.cfg.max_logit_scale))


def build_image_tower(cfg: ModelConfig, embed_dim: int) -> ImageTower:
    """Build the tower for a text encoder whose embeddings have `embed_dim` dimensions."""
    return ImageTower(cfg, embed_dim)


def count_parameters(module: nn.Module) -> dict[str, int]:
    """Trainable and total parameter counts."""
    total = sum(p.numel() for p in module.parameters())
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return {"trainable": trainable, "total": total}


def tower_state(model: ImageTower) -> dict:
    """The checkpoint entries that rebuild the tower on its own (`load_image_tower`)."""
    return {"model_config": asdict(model.cfg), "embed_dim": model.embed_dim, "model": model.state_dict()}


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load a clipft checkpoint dict, or raise ModelError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a bad file
        raise ModelError(f"{path}: not a readable checkpoint ({e.__class__.__name__}: {e})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_config" not in ckpt:
        raise ModelError(f"{path}: not a clipft checkpoint (no model / model_config entries)")
    return ckpt


def tower_from_checkpoint(ckpt: dict) -> ImageTower:
    """Rebuild the tower from a checkpoint dict; backbone weights come from it, never downloaded."""
    fields = dict(ckpt["model_config"])
    model = ImageTower(ModelConfig(**{**fields, "image_weights": "none"}), ckpt["embed_dim"])
    model.load_state_dict(ckpt["model"])
    model.cfg = ModelConfig(**fields)  # keep the record of how it was initialised
    return model.eval()


def load_image_tower(path: str | Path, map_location: str | torch.device = "cpu") -> ImageTower:
    """A trained tower from a checkpoint file, in eval mode: the entry point for inference."""
    return tower_from_checkpoint(read_checkpoint(path, map_location))
