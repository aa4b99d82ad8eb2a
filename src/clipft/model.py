"""The trainable image tower: backbone (torchvision ResNet, or any timm model: backbones.py) + MLP
projection head + logit scale.

The tower is self-contained (config + state dict rebuild it), so an exported checkpoint can be
loaded for inference without the trainer or the text side: `load_image_tower(path)`.
"""

from __future__ import annotations

import logging
import math
import pickle
import re
import zipfile
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from . import backbones
from .backbones import ModelError  # noqa: F401 - clipft.model.ModelError, where users catch it
from .config import HeadNorm, ModelConfig, Pooling, choices

log = logging.getLogger(__name__)

# name -> (constructor, ImageNet weights enum member name, pooled feature width)
BACKBONES = {
    "resnet18": ("resnet18", "ResNet18_Weights", "IMAGENET1K_V1", 512),
    "resnet34": ("resnet34", "ResNet34_Weights", "IMAGENET1K_V1", 512),
    "resnet50": ("resnet50", "ResNet50_Weights", "IMAGENET1K_V2", 2048),
    "resnet101": ("resnet101", "ResNet101_Weights", "IMAGENET1K_V2", 2048),
}



def imagenet_weights(backbone: str):
    """The torchvision weights enum member used for `image_weights=imagenet`."""
    _, enum_name, member, _ = BACKBONES[backbone]
    return getattr(getattr(torchvision.models, enum_name), member)


def ensure_image_weights(backbone: str, weights: str) -> Path | None:
    """Make sure `build_backbone` will find its pretrained weights, before any expensive step
    (caption caching) runs: the cached file, else a download now. ModelError (one line naming the
    file to place) when neither works; None for image_weights=none. timm backbones and weight files:
    backbones.py (a timm tag is fetched into the Hugging Face cache; a file was checked before)."""
    if backbones.is_timm(backbone):
        backbones.check_timm_name(backbone)
        if weights == "imagenet" or weights.startswith(backbones.TIMM_PREFIX):
            backbones.ensure_timm_weights(backbone, weights)
        return None
    if backbone not in BACKBONES:  # before any work (and before a run directory records it)
        raise ModelError(f"unknown backbone {backbone!r} (choose from {', '.join(BACKBONES)}, or timm:NAME)")
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


def build_backbone(name: str, weights: str, weights_sha256: str = "") -> tuple[nn.Module, int]:
    """A torchvision ResNet with its classifier removed; returns (module, pooled feature dim).
    weights: imagenet, none, or a weights file (loaded strictly after fc is removed)."""
    if name not in BACKBONES:
        raise ModelError(f"unknown backbone {name!r} (choose from {', '.join(BACKBONES)}, or timm:NAME)")
    if weights not in ("imagenet", "none") and not backbones.is_weight_file(weights):
        raise ModelError(f"model.image_weights must be imagenet, none or a .safetensors/.pth/.pt file for "
                         f"torchvision {name}, got {weights!r}")
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
    if backbones.is_weight_file(weights):
        backbones.load_weight_file(net, weights, expected_sha256=weights_sha256)
    return net, feat_dim


def build_tower_backbone(cfg: ModelConfig) -> tuple[nn.Module, int, dict]:
    """(backbone, width the head takes, weights info: source and expected normalisation)."""
    if backbones.is_timm(cfg.backbone):
        return backbones.build_timm_backbone(cfg)
    net, dim = build_backbone(cfg.backbone, cfg.image_weights, cfg.image_weights_sha256)
    if cfg.grad_checkpointing:
        raise ModelError("model.grad_checkpointing needs a timm backbone (model.backbone=timm:NAME)")
    return net, dim, backbones.weights_info(cfg)


def build_backbone_meta(cfg: ModelConfig) -> tuple[nn.Module, int]:
    """(the backbone without weights on the meta device: no memory, no download, its stage count)."""
    with torch.device("meta"):
        if backbones.is_timm(cfg.backbone):
            net = backbones._create(backbones.check_timm_name(cfg.backbone))
            return net, len(backbones.stage_parameter_names(net))
        net, _ = build_backbone(cfg.backbone, "none")
    return net, len(STAGES)


def fill_weights_sha256(cfg) -> None:
    """Record a weights file's sha256 in cfg.image_weights_sha256 when none is recorded yet (what a
    resume compares); every other check is `check_model_config`'s."""
    if backbones.is_weight_file(cfg.image_weights) and not cfg.image_weights_sha256 and Path(cfg.image_weights).is_file():
        cfg.image_weights_sha256 = backbones.file_sha256(cfg.image_weights)


def check_model_config(cfg) -> None:
    """Everything about model.backbone / image_weights / pooling / trainable_stages that can fail,
    checked before any data is read. A weights file is checked against the architecture and its
    sha256 recorded in cfg.image_weights_sha256 (a recorded one that differs is refused)."""
    if backbones.is_timm(cfg.backbone):
        arch = backbones.check_timm_name(cfg.backbone)
        info = backbones.probe(arch)
        backbones.check_pooling(cfg, info)
        n = info["stages"]
        if cfg.image_weights.startswith(backbones.TIMM_PREFIX):
            backbones.pretrained_name(cfg.backbone, cfg.image_weights)
    else:
        n = None
    if cfg.image_weights.startswith(backbones.TIMM_PREFIX) and not backbones.is_timm(cfg.backbone):
        raise ModelError(f"model.image_weights={cfg.image_weights!r} needs a timm backbone (model.backbone=timm:NAME)")
    net, stages = build_backbone_meta(cfg)
    n = stages if n is None else n
    if not -1 <= cfg.trainable_stages <= n:
        raise ModelError(f"model.trainable_stages must be -1 (all) or 0..{n} for {cfg.backbone}, "
                           f"got {cfg.trainable_stages}")
    if backbones.is_weight_file(cfg.image_weights):
        how = backbones.check_weight_file(net, cfg.image_weights)
        digest = backbones.file_sha256(cfg.image_weights)
        if cfg.image_weights_sha256 and cfg.image_weights_sha256 != digest:
            raise ModelError(f"{cfg.image_weights}: sha256 {digest[:12]}... is not the recorded "
                               f"model.image_weights_sha256 {cfg.image_weights_sha256[:12]}... (the file changed)")
        cfg.image_weights_sha256 = digest
        log.info("image weights: %s (sha256 %s%s)", cfg.image_weights, digest[:12],
                 ", matched by order and shape" if how == "order" else "")
    elif cfg.image_weights_sha256:
        raise ModelError("model.image_weights_sha256 is only for a weights file (model.image_weights=PATH)")


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
        self.cfg = cfg
        self.embed_dim = embed_dim
        self.is_timm = backbones.is_timm(cfg.backbone)
        if not self.is_timm and not -1 <= cfg.trainable_stages <= len(STAGES):
            raise ModelError(f"model.trainable_stages must be -1 (all) or 0..{len(STAGES)}, got {cfg.trainable_stages}")
        # weights_info: where the backbone's weights come from and the mean/std they expect (None: unknown)
        self.backbone, feat_dim, self.weights_info = build_tower_backbone(cfg)
        n_stages = len(self.stage_parameters())
        if not -1 <= cfg.trainable_stages <= n_stages:
            raise ModelError(f"model.trainable_stages must be -1 (all) or 0..{n_stages} for {cfg.backbone}, "
                             f"got {cfg.trainable_stages}")
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
        """[B, 3, H, W] -> the last stage's map [B, F, H/32, W/32] (before pooling; timm: forward_features)."""
        if self.is_timm:
            x = self.backbone.forward_features(images)
            nhwc = backbones.probe(backbones.timm_arch(self.cfg.backbone))["nhwc"]
            return x.permute(0, 3, 1, 2) if nhwc else x  # [B, H, W, C] (Swin) -> [B, C, H, W]
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
            feats = self.backbone(images)  # [B, F] (the backbone's own pooling: average, or a ViT's token)
        else:
            feats = self.pool(self.feature_map(images))  # [B, F]
        return F.normalize(self.head(feats).float(), dim=-1)  # [B, D], fp32 even under autocast

    def backbone_stages(self) -> list[list[nn.Module]]:
        """The torchvision backbone's stages in forward order: [stem (conv1, bn1), layer1, ..., layer4]."""
        return [[getattr(self.backbone, name) for name in names] for names in STAGES]

    def stage_parameters(self) -> list[list[nn.Parameter]]:
        """The backbone's parameters by stage, in forward order: torchvision's STAGES, or a timm model's
        coarse `group_matcher` groups (stem, each stage or block, final norm)."""
        if not self.is_timm:
            return [[p for m in modules for p in m.parameters()] for modules in self.backbone_stages()]
        params = dict(self.backbone.named_parameters())
        return [[params[n] for n in names] for names in backbones.stage_parameter_names(self.backbone)]

    def set_backbone_trainable(self, trainable: bool) -> None:
        """trainable=False freezes the whole backbone; True unfreezes the stages that
        `cfg.trainable_stages` allows (all for -1). Frozen BatchNorms go to eval mode at once and
        on every later `train()`."""
        stages = self.stage_parameters()
        n = len(stages) if self.cfg.trainable_stages < 0 else self.cfg.trainable_stages
        for i, params in enumerate(stages):
            on = trainable and i >= len(stages) - n
            for p in params:
                p.requires_grad_(on)
        self.train(self.training)

    def frozen_batchnorms(self) -> list[nn.Module]:
        """Backbone BatchNorm layers that must not update their running statistics."""
        return [m for m in self.backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                and (self.cfg.freeze_bn_stats or (m.weight is not None and not m.weight.requires_grad))]

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


# What `read_checkpoint` requires by default: the entries that rebuild the tower (`tower_state`).
TOWER_KEYS = ("model", "model_config", "embed_dim")
_TYPES = {"model": dict, "model_config": dict, "embed_dim": int, "config": dict, "epoch": int, "step": int}


def _first_sentence(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0].split(". ")[0][:160]


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", require: tuple[str, ...] = TOWER_KEYS,
                    what: str = "clipft checkpoint", mmap: bool = False) -> dict:
    """A clipft checkpoint dict, or ModelError (one line naming the file and what is wrong).

    The one reader of checkpoint files (inference, export, evaluate, resume): `torch.load` with
    weights_only=True (no code in the file runs; `checkpoint_file.load_safely`), the content
    checked against its stored checksum (`checkpoint_file.checksum_problem`), and the entries
    `require` present with the right types (`what` names the kind of file in the message)."""
    from .checkpoint_file import checksum_problem, load_safely
    path = Path(path)
    if path.is_dir():
        found = [p.name for p in (path / "best.pt", path / "last.pt") if p.is_file()]
        hint = f"; did you mean {path / found[0]}?" if found else " (a checkpoint is a file such as RUN/best.pt)"
        raise ModelError(f"{path}: is a directory, not a checkpoint file{hint}")
    if not path.is_file():
        raise ModelError(f"{path}: checkpoint not found")
    if not zipfile.is_zipfile(path):  # every torch.save file is a zip archive; a pickle alone never loads
        raise ModelError(f"{path} cannot be read: not a readable checkpoint (not a PyTorch file: "
                         "another kind of file, or one cut short)")
    try:
        ckpt = load_safely(path, map_location=map_location, mmap=mmap)
    except pickle.UnpicklingError as e:  # the restricted unpickler refused a global: code, not data
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        call = f" ({found.group(1)})" if found else ""
        raise ModelError(f"{path}: not a {what} (it holds a pickled object or call{call} clipft never "
                         "writes; refused without running it)") from None
    except Exception as e:  # noqa: BLE001 - torch raises RuntimeError, EOFError, zip errors, ...
        raise ModelError(f"{path} cannot be read: not a readable checkpoint ({type(e).__name__}: "
                         f"{_first_sentence(e)})") from None
    if not isinstance(ckpt, dict):
        raise ModelError(f"{path}: not a {what} (it holds a {type(ckpt).__name__}, not a dict)")
    missing = [k for k in require if k not in ckpt]
    if missing:
        raise ModelError(f"{path}: not a {what} (no {' / '.join(missing)} entries)")
    wrong = [f"{k} is a {type(ckpt[k]).__name__}" for k in require
             if k in _TYPES and not isinstance(ckpt[k], _TYPES[k])]
    if wrong:
        raise ModelError(f"{path}: not a {what} ({'; '.join(wrong)})")
    problem = checksum_problem(ckpt)
    if problem:
        raise ModelError(f"{path}: damaged checkpoint ({problem})")
    return ckpt


def rebuild_tower(model_config: dict, embed_dim: int, state: dict[str, torch.Tensor], source: str = "") -> ImageTower:
    """The one builder of a saved tower (checkpoint or export folder), in eval mode: the architecture
    from its recorded ModelConfig with image_weights=none (a timm model is created WITHOUT any
    pretrained download, a weights file is not read), then the saved state, strictly. ModelError
    naming `source` when the state does not fit the config."""
    fields = dict(model_config)
    try:
        model = ImageTower(ModelConfig(**{**fields, "image_weights": "none", "image_weights_sha256": "",
                                          "grad_checkpointing": False}), int(embed_dim))
        if "logit_bias" in state:  # trained with train.loss=siglip
            model.add_logit_bias(0.0)
        model.load_state_dict(state)
        model.cfg = ModelConfig(**fields)  # keep the record of how it was initialised
    except ModelError as e:  # e.g. a timm name this timm does not know
        raise ModelError(f"{source}: {e}" if source else str(e)) from None
    except (RuntimeError, TypeError, ValueError, KeyError) as e:
        raise ModelError(f"{source or 'checkpoint'}: the tower's weights do not fit its recorded config "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})") from None
    return model.eval()


def tower_from_checkpoint(ckpt: dict, source: str = "") -> ImageTower:
    """Rebuild the tower from a checkpoint dict; backbone weights come from it, never downloaded."""
    return rebuild_tower(ckpt["model_config"], ckpt["embed_dim"], ckpt["model"], source)


def load_image_tower(path: str | Path, map_location: str | torch.device = "cpu") -> ImageTower:
    """A trained tower from a checkpoint file, in eval mode: the entry point for inference."""
    return tower_from_checkpoint(read_checkpoint(path, map_location))
