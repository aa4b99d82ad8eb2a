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

from .config import HeadNorm, ModelConfig, Pooling, choices

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


def ensure_image_weights(backbone: str, weights: str) -> Path | None:
    """Make sure `build_backbone` will find its pretrained weights, before any expensive step
    (caption caching) runs: the cached file, else a download now. ModelError (one line naming the
    file to place) when neither works; None for image_weights=none."""
    if backbone not in BACKBONES:  # before any work (and before a run directory records it)
        raise ModelError(f"unknown backbone {backbone!r} (choose from {', '.join(BACKBONES)})")
    if weights != "imagenet":
        return None  # other values fail in build_backbone with their own message
    w = imagenet_weights(backbone)
    cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(w.url).name
    if cache.is_file():
        return cache
    try:
        w.get_state_dict(progress=False)  # downloads into the torch hub cache
    except (OSError, RuntimeError) as e:
        raise ModelError(
            f"could not load {backbone} ImageNet weights ({w}): {e.__class__.__name__}. Without network, "
            f"place the file at {cache} or use --set model.image_weights=none") from None
    return cache


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


HEAD_NORMS = choices(HeadNorm)  # model.head_norm, owned by the config schema
POOLINGS = choices(Pooling)
# Backbone stages in forward order; `model.trainable_stages=N` unfreezes only the last N.
STAGES = (("conv1", "bn1"), ("layer1",), ("layer2",), ("layer3",), ("layer4",))


def head_widths(in_dim: int, hidden: int, layers: int, out_dim: int) -> list[int]:
    """Layer widths of the head: [in, hidden, hidden/2, ..., out] for `layers` linear layers
    (e.g. 2048 -> 1024 -> 512 -> D for layers=3, hidden=1024)."""
    return [in_dim] + [max(1, hidden // 2 ** i) for i in range(layers - 1)] + [out_dim]


class ProjectionHead(nn.Module):
    """Linear(in, hidden) -> GELU -> Linear(hidden, out) by default.

    Variants (combinable, from ModelConfig): more layers (widths halve), a norm after each hidden
    linear layer (BatchNorm1d or LayerNorm, before the GELU), dropout after each hidden GELU, and a
    residual form out = MLP(x) + W x with a learned linear shortcut W (in != out, so no identity).
    The output layer has no norm: it feeds the L2 normalisation directly.
    """

    def __init__(self, in_dim: int, hidden: int, out_dim: int, layers: int = 2, norm: str = "none",
                 dropout: float = 0.0, residual: bool = False):
        super().__init__()
        if layers < 1:
            raise ModelError(f"model.head_layers must be >= 1, got {layers}")
        if not 0.0 <= dropout < 1.0:
            raise ModelError(f"model.head_dropout must be in [0, 1), got {dropout}")
        widths = head_widths(in_dim, hidden, layers, out_dim)
        mods: list[nn.Module] = []
        for a, b in zip(widths[:-2], widths[1:-1]):  # hidden layers
            mods.append(nn.Linear(a, b))
            if norm == "batchnorm":
                mods.append(nn.BatchNorm1d(b))
            elif norm == "layernorm":
                mods.append(nn.LayerNorm(b))
            mods.append(nn.GELU())
            if dropout > 0:
                mods.append(nn.Dropout(dropout))
        mods.append(nn.Linear(widths[-2], widths[-1]))
        # Defaults give exactly Sequential(Linear, GELU, Linear): same keys, same init as before.
        self.net = nn.Sequential(*mods)
        self.shortcut = nn.Linear(in_dim, out_dim, bias=False) if residual else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)  # [B, out]
        if self.shortcut is not None:
            out = out + self.shortcut(x)
        return out


class AttentionPool2d(nn.Module):
    """CLIP's attention pooling (ModifiedResNet.attnpool): the mean feature, prepended to the
    feature map's HxW tokens, is the single query of a multi-head QKV attention over all of them.

    [B, C, H, W] -> [B, C]. Learned positional embeddings for a grid x grid map (7x7 = a 224-px
    ResNet input) are resized bicubically to the actual map, so any image size works.
    """

    def __init__(self, dim: int, heads: int, grid: int = 7):
        super().__init__()
        self.grid = grid
        self.positional_embedding = nn.Parameter(torch.randn(grid * grid + 1, dim) / dim ** 0.5)  # [1+g*g, C]
        self.attn = nn.MultiheadAttention(dim, heads)  # q/k/v projections + output projection

    def _positions(self, h: int, w: int) -> torch.Tensor:
        pos = self.positional_embedding  # [1+g*g, C]
        if (h, w) == (self.grid, self.grid):
            return pos
        spatial = pos[1:].T.reshape(1, -1, self.grid, self.grid)  # [1, C, g, g]
        spatial = F.interpolate(spatial, size=(h, w), mode="bicubic", align_corners=False)
        return torch.cat([pos[:1], spatial.reshape(pos.shape[1], h * w).T])  # [1+h*w, C]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = x.flatten(2).permute(2, 0, 1)  # [HW, B, C]
        tokens = torch.cat([tokens.mean(dim=0, keepdim=True), tokens])  # [1+HW, B, C]
        tokens = tokens + self._positions(h, w)[:, None, :].to(tokens.dtype)
        out, _ = self.attn(tokens[:1], tokens, tokens, need_weights=False)  # [1, B, C]
        return out[0]


class ImageTower(nn.Module):
    """images [B, 3, H, W] -> L2-normalised embeddings [B, D] in the text encoder's space.

    Parts: `backbone` (torchvision ResNet, fc removed), optional `pool` (attention pooling; None =
    the ResNet's own global average pool), `head` (projection MLP) and `logit_scale`.

    Freezing (`trainable_stages`, `set_backbone_trainable`) means: no gradients for the frozen
    backbone parameters AND their BatchNorm layers in eval mode, so a frozen part computes exactly
    the same function as before - its running statistics do not drift either. `freeze_bn_stats`
    keeps every backbone BatchNorm in eval mode (its affine weights still train, if unfrozen).
    """

    def __init__(self, cfg: ModelConfig, embed_dim: int):
        super().__init__()
        if not -1 <= cfg.trainable_stages <= len(STAGES):
            raise ModelError(f"model.trainable_stages must be -1 (all) or 0..{len(STAGES)}, got {cfg.trainable_stages}")
        self.cfg = cfg
        self.embed_dim = embed_dim
        self.backbone, feat_dim = build_backbone(cfg.backbone, cfg.image_weights)
        self.head = ProjectionHead(feat_dim, cfg.head_hidden, embed_dim, layers=cfg.head_layers,
                                   norm=cfg.head_norm, dropout=cfg.head_dropout, residual=cfg.head_residual)
        # Stored as log(1/tau) like CLIP; trainable only when learnable_temperature. The training
        # step clamps it so 1/tau <= max_logit_scale.
        init = math.log(1.0 / cfg.temperature)
        self.logit_scale = nn.Parameter(torch.tensor(init), requires_grad=cfg.learnable_temperature)
        # Created last so the default tower draws the same random init as before these options.
        # CLIP uses 64-wide attention heads (512 -> 8 heads, 2048 -> 32).
        self.pool = AttentionPool2d(feat_dim, max(1, feat_dim // 64)) if cfg.pooling == "attention" else None
        self.register_parameter("logit_bias", None)  # SigLIP's b (train.loss=siglip: `add_logit_bias`)
        self.set_backbone_trainable(True)

    def add_logit_bias(self, value: float) -> None:
        """A learnable logit bias (0-d), the b of SigLIP's sigmoid loss (train.loss=siglip): a
        parameter of the tower, so DDP reduces its gradient and checkpoints hold it. Retrieval
        ranks by cosine and never reads it."""
        self.logit_bias = nn.Parameter(torch.tensor(float(value), device=self.logit_scale.device))

    def feature_map(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> the last ResNet stage's map [B, F, H/32, W/32] (before pooling)."""
        b = self.backbone
        x = b.maxpool(b.relu(b.bn1(b.conv1(images))))
        return b.layer4(b.layer3(b.layer2(b.layer1(x))))

    def forward(self, images: torch.Tensor, with_logit_scale: bool = False):
        """images [B, 3, H, W] -> embeddings [B, D] (inference, evaluation, ONNX export); with
        with_logit_scale=True (training) -> (embeddings [B, D], 1/tau 0-d fp32): everything the loss
        uses comes out of the forward, so DDP sees the logit scale's use and reduces its gradient
        once (used outside the forward, with find_unused_parameters DDP marks it unused and then
        fails when its gradient arrives)."""
        emb = self.encode(images)
        if not with_logit_scale:
            return emb
        scale = self.logit_scale.float().exp()
        if self.logit_bias is not None:  # in the forward's graph (value unchanged): DDP sees the bias used
            scale = scale + 0.0 * self.logit_bias.float()
        return emb, scale

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] -> L2-normalised embeddings [B, D], fp32."""
        if self.pool is None:
            feats = self.backbone(images)  # [B, F] (the ResNet's own average pool)
        else:
            feats = self.pool(self.feature_map(images))  # [B, F]
        return F.normalize(self.head(feats).float(), dim=-1)  # [B, D], fp32 even under autocast

    def backbone_stages(self) -> list[list[nn.Module]]:
        """The backbone's stages in forward order: [stem (conv1, bn1), layer1, ..., layer4]."""
        return [[getattr(self.backbone, name) for name in names] for names in STAGES]

    def set_backbone_trainable(self, trainable: bool) -> None:
        """trainable=False freezes the whole backbone; True unfreezes the stages that
        `cfg.trainable_stages` allows (all for -1). Frozen BatchNorms go to eval mode at once and
        on every later `train()`."""
        stages = self.backbone_stages()
        n = len(stages) if self.cfg.trainable_stages < 0 else self.cfg.trainable_stages
        for i, modules in enumerate(stages):
            on = trainable and i >= len(stages) - n
            for m in modules:
                for p in m.parameters():
                    p.requires_grad_(on)
        self.train(self.training)

    def frozen_batchnorms(self) -> list[nn.Module]:
        """Backbone BatchNorm layers that must not update their running statistics."""
        return [m for m in self.backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                and (self.cfg.freeze_bn_stats or not m.weight.requires_grad)]

    def train(self, mode: bool = True) -> "ImageTower":
        super().train(mode)
        if mode:
            for m in self.frozen_batchnorms():
                m.eval()  # use (and keep) the running statistics
        return self

    def clamp_logit_scale_(self) -> None:
        """Keep a learnable 1/tau in [1, max_logit_scale] (CLIP's clamp, stops the temperature
        collapsing). A fixed temperature is the user's choice and is never moved."""
        if not self.cfg.learnable_temperature:
            return
        with torch.no_grad():
            self.logit_scale.clamp_(0.0, math.log(self.cfg.max_logit_scale))


def build_image_tower(cfg: ModelConfig, embed_dim: int) -> ImageTower:
    """Build the tower for a text encoder whose embeddings have `embed_dim` dimensions."""
    return ImageTower(cfg, embed_dim)


def parameter_parts(model: ImageTower) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """(name, parameter) lists of the tower's parts: "backbone" (pretrained ResNet), "head"
    (projection head and attention pool: newly initialised) and "logit_scale"."""
    parts: dict[str, list[tuple[str, nn.Parameter]]] = {"backbone": [], "head": [], "logit_scale": []}
    for name, p in model.named_parameters():
        part = "logit_scale" if name == "logit_scale" else "backbone" if name.startswith("backbone.") else "head"
        parts[part].append((name, p))
    return parts


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
    if path.is_dir():
        found = [p.name for p in (path / "best.pt", path / "last.pt") if p.is_file()]
        hint = f"; did you mean {path / found[0]}?" if found else " (a checkpoint is a file such as RUN/best.pt)"
        raise ModelError(f"{path}: is a directory, not a checkpoint file{hint}")
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
    if "logit_bias" in ckpt["model"]:  # trained with train.loss=siglip
        model.add_logit_bias(0.0)
    model.load_state_dict(ckpt["model"])
    model.cfg = ModelConfig(**fields)  # keep the record of how it was initialised
    return model.eval()


def load_image_tower(path: str | Path, map_location: str | torch.device = "cpu") -> ImageTower:
    """A trained tower from a checkpoint file, in eval mode: the entry point for inference."""
    return tower_from_checkpoint(read_checkpoint(path, map_location))
