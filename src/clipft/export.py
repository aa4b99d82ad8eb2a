"""`clipft export CKPT --out DIR [--onnx]`: a self-contained model folder in the Hugging Face hub layout.

    DIR/model.safetensors   the image tower (backbone + head + logit scale), no optimizer state
    DIR/config.json         everything that rebuilds and uses the tower (see `export_config`)
    DIR/README.md           a model card generated from the run (clipft.modelcard)
    DIR/image_tower.onnx    with --onnx: pixel_values [B, 3, H, W] float32 (normalised) ->
                            image_embeds [B, D] (L2-normalised), dynamic batch axis
    DIR/open_clip_config.json, open_clip_model.safetensors
                            the whole model for open_clip where the towers map (clipft.export_open_clip)
    DIR/image_tower.int8.onnx  with --onnx --quantize int8 (clipft.quantize)

The ONNX file is run with onnxruntime on real images before it is kept and compared with the
PyTorch tower (max abs difference <= ONNX_TOLERANCE at two batch sizes); an export that fails is
refused and nothing is written. Files are written under temporary names and renamed into place,
so an interrupted export never leaves a half-written model that looks complete.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
from pathlib import Path
from typing import Sequence

import torch

from . import __version__
from .inference import (CONFIG_FILE, EXPORT_FORMAT, EXPORT_FORMAT_VERSION, ONNX_FILE, WEIGHTS_FILE, file_sha256,
                        load, text_fingerprint)
from .model import ImageTower, ModelError, read_checkpoint, tower_from_checkpoint

log = logging.getLogger(__name__)

ONNX_TOLERANCE = 1e-4
ONNX_MIN_TORCH = (2, 5)  # torch.onnx.export(dynamo=True, dynamic_shapes=..., external_data=...)
CARD_FILE = "README.md"
PARITY_IMAGES = 8


def export_config(tower: ImageTower, cfg: dict, text_encoder: dict, source: dict) -> dict:
    """config.json: backbone, head layout, pooling, image size, normalisation, embedding size,
    temperature, the text encoder (name, max_length, fingerprint) and the clipft version. The
    full ModelConfig is kept too (`model_config`): it is what `api.load` rebuilds the tower from."""
    m, d = tower.cfg, cfg["data"]
    logit_scale = float(tower.logit_scale.detach().exp())
    return {
        "format": EXPORT_FORMAT, "format_version": EXPORT_FORMAT_VERSION, "clipft_version": __version__,
        "architecture": "clipft.ImageTower", "backbone": m.backbone, "pooling": m.pooling,
        "head": {"hidden_size": m.head_hidden, "layers": m.head_layers, "norm": m.head_norm,
                 "dropout": m.head_dropout, "residual": m.head_residual},
        "embed_dim": tower.embed_dim, "image_size": int(d["image_size"]),
        "mean": [float(x) for x in d["mean"]], "std": [float(x) for x in d["std"]],
        "preprocessing": "RGB, centre square resized to image_size (bicubic, antialiased), /255, (x - mean) / std",
        "temperature": 1.0 / logit_scale, "logit_scale": logit_scale,
        "text_encoder": text_encoder, "model_config": _jsonable(vars(m)),
        "files": {"weights": WEIGHTS_FILE}, "source": source,
    }


def _jsonable(d: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def _text_encoder_entry(cfg: dict, embed_dim: int) -> dict:
    """Load the run's frozen text encoder once: its name (a local directory made absolute, so the
    folder still finds it from elsewhere), max_length and fingerprint."""
    from .text import load_text_encoder
    name, max_length = cfg["text"]["encoder"], int(cfg["text"].get("max_length", 77))
    enc = load_text_encoder(name, max_length=max_length)
    if enc.dim != embed_dim:
        raise ModelError(f"text encoder {name!r} gives {enc.dim}-d embeddings, the tower {embed_dim}-d")
    local = Path(name).expanduser()
    recorded = str(local.resolve()) if local.is_dir() else name
    return {"name": recorded, "kind": enc.kind, "max_length": enc.max_length, "fingerprint": text_fingerprint(enc)}


# --------------------------------------------------------------------------- ONNX

def check_onnx_tools() -> None:
    """ModelError (one line, with the install hint) when the exporter's or the check's packages are
    missing, or torch predates the exporter clipft calls (torch.onnx.export(dynamo=True, ...): 2.5)."""
    have = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
    if have < ONNX_MIN_TORCH:
        raise ModelError(f"--onnx needs torch >= {ONNX_MIN_TORCH[0]}.{ONNX_MIN_TORCH[1]} (its torch.export-based "
                         f"exporter); this is torch {torch.__version__}: pip install 'clipft[onnx]'")
    try:
        import onnx  # noqa: F401 - the exporter needs both; fail with an install hint, not deep inside it
        import onnxruntime  # noqa: F401 - the parity check runs the file
        import onnxscript  # noqa: F401
    except ImportError:
        raise ModelError("--onnx needs the onnx, onnxscript and onnxruntime packages: "
                         "pip install 'clipft[onnx]'") from None


def export_onnx(tower: ImageTower, path: Path, image_size: int) -> Path:
    """Write `tower` as ONNX (torch.export-based exporter): input pixel_values [B, 3, S, S],
    output image_embeds [B, D], B dynamic. Needs the onnx and onnxscript packages."""
    check_onnx_tools()
    example = torch.zeros(2, 3, image_size, image_size)
    batch = torch.export.Dim("batch", min=1)
    with contextlib.redirect_stdout(io.StringIO()):  # the exporter prints its progress
        torch.onnx.export(tower.eval(), (example,), str(path), input_names=["pixel_values"],
                          output_names=["image_embeds"], dynamic_shapes={"images": {0: batch}},
                          dynamo=True, external_data=False, verbose=False)
    return path


def onnx_parity(tower: ImageTower, onnx_path: Path, pixels: torch.Tensor) -> float:
    """Max abs difference of the ONNX file (onnxruntime, CPU) and the tower on `pixels` [B, 3, S, S],
    over the whole batch and over its first image alone (the batch axis must really be dynamic)."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise ModelError("the ONNX check needs onnxruntime: pip install 'clipft[onnx]'") from None
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    worst = 0.0
    with torch.inference_mode():
        for batch in (pixels, pixels[:1]):
            want = tower.eval()(batch)
            got = torch.from_numpy(session.run(["image_embeds"], {"pixel_values": batch.numpy()})[0])
            if got.shape != want.shape:
                raise ModelError(f"{onnx_path}: output {tuple(got.shape)} for input {tuple(batch.shape)}, "
                                 f"expected {tuple(want.shape)}")
            worst = max(worst, float((got - want).abs().max()))
    return worst


def parity_images(ckpt_path: Path, cfg: dict, check_images: str | Path | None) -> list[Path]:
    """Real images for the ONNX check: the first PARITY_IMAGES of `check_images` (a folder), else
    of the run's validation split (its data root from RUN/summary.json)."""
    if check_images is not None:
        from .embed import list_images
        folder = Path(check_images)
        if not folder.is_dir():
            raise ModelError(f"{folder}: --check-images must be a folder of images")
        found = [folder / p for p in list_images(folder)]
        if not found:
            raise ModelError(f"{folder}: --check-images holds no images to check the ONNX file on")
        return found
    summary = ckpt_path.parent / "summary.json"
    try:
        root = json.loads(summary.read_text())["data_root"]
        from .config import from_dict
        from .data import load_split
        conf = from_dict(cfg)
        return [rec.path for rec in load_split(root, conf.data.val_split, conf.data).images]
    except Exception as e:  # noqa: BLE001 - no summary, moved data, ...: say what to pass instead
        raise ModelError(f"{ckpt_path}: no real images to check the ONNX file on (the run's validation data "
                         f"is not available: {type(e).__name__}); pass --check-images FOLDER") from None


def _parity_pixels(model, paths: Sequence[Path]) -> torch.Tensor:
    pixels = []
    for p in paths:
        try:
            pixels.append(model.pixels(p))
        except ValueError:
            continue  # unreadable: take the next one
        if len(pixels) == PARITY_IMAGES:
            break
    if not pixels:
        raise ModelError(f"none of the {len(paths)} check images could be read; pass --check-images FOLDER")
    return torch.stack(pixels)


# --------------------------------------------------------------------------- open_clip form

# The image-tower-only form earlier versions wrote; an export now removes them (export_open_clip
# writes the whole model instead).
OPEN_CLIP_CONFIG, OPEN_CLIP_WEIGHTS = "open_clip_visual.json", "open_clip_visual.safetensors"


def _timm_arch(backbone: str) -> str:
    from .backbones import is_timm, timm_arch
    return timm_arch(backbone) if is_timm(backbone) else backbone  # torchvision ResNets: timm's keys are the same


def _own_pool(tower: ImageTower) -> str:
    """The backbone's own pooling as timm names it (avg; token for a ViT): open_clip resets the trunk
    with it, so its pooled features are the tower's."""
    pool = getattr(tower.backbone, "global_pool", None)
    pool = getattr(pool, "pool_type", pool)  # SelectAdaptivePool2d (ResNet, EfficientNet) or a ViT's string
    if pool is None:
        head_pool = getattr(getattr(tower.backbone, "head", None), "global_pool", None)  # ConvNeXt's NormMlpHead
        pool = getattr(head_pool, "pool_type", None)
    return str(pool or "avg")


def open_clip_form(tower: ImageTower, config: dict) -> tuple[dict, dict[str, torch.Tensor]] | str:
    """The tower as open_clip's timm image tower (`open_clip.timm_model.TimmModel` with pool avg and
    `timm_proj: mlp`: Linear(F, 2D) -> GELU -> Linear(2D, D)): (open_clip vision config, state dict
    with TimmModel's keys), or the reason the head layout does not map onto it."""
    m, d = tower.cfg, tower.embed_dim
    why = [w for bad, w in ((m.pooling != "avg", f"pooling {m.pooling} (open_clip's timm tower: avg)"),
                            (m.head_layers != 2, f"{m.head_layers} head layers (timm_proj mlp: 2)"),
                            (m.head_hidden != 2 * d, f"head hidden {m.head_hidden} != 2 x embedding {d}"),
                            (m.head_norm != "none", f"head norm {m.head_norm}"),
                            (m.head_residual, "residual head")) if bad]
    if why:
        return "; ".join(why)
    linears = [mod for mod in tower.head.net if isinstance(mod, torch.nn.Linear)]  # [fc1, fc2]
    state = {"trunk." + k[len("backbone."):]: v for k, v in tower.state_dict().items() if k.startswith("backbone.")}
    for name, lin in zip(("fc1", "fc2"), linears):
        state[f"head.mlp.{name}.weight"], state[f"head.mlp.{name}.bias"] = lin.weight.detach(), lin.bias.detach()
    cfg = {"embed_dim": d,
           "vision_cfg": {"timm_model_name": _timm_arch(m.backbone), "timm_model_pretrained": False,
                          "timm_pool": _own_pool(tower),
                          "timm_proj": "mlp", "timm_proj_bias": True, "timm_drop": m.head_dropout,
                          "image_size": config["image_size"]},
           "preprocess_cfg": {"mean": config["mean"], "std": config["std"], "interpolation": "bicubic",
                              "resize_mode": "shortest"},
           "logit_scale": config["logit_scale"], "text_encoder": config["text_encoder"]["name"],
           "note": "image tower only: the text side is the frozen text encoder named here, not an open_clip tower"}
    return cfg, {k: v.contiguous() for k, v in state.items()}


# --------------------------------------------------------------------------- export

def _umask_mode() -> int:
    """0o666 less the process umask: the mode a plain open() gives a new file."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.chmod(tmp, _umask_mode())  # safetensors creates its files 0600: every file of the folder alike
    os.replace(tmp, path)


def _check_out_dir(out: Path) -> None:
    from .export_open_clip import OPEN_CLIP_FILES
    from .quantize import INT8_ONNX_FILE
    known = {CONFIG_FILE, WEIGHTS_FILE, ONNX_FILE, CARD_FILE, OPEN_CLIP_CONFIG, OPEN_CLIP_WEIGHTS, INT8_ONNX_FILE,
             *OPEN_CLIP_FILES}
    if out.is_file():
        raise ModelError(f"{out}: exists and is a file; --out must be a folder")
    if out.is_dir():
        other = sorted(p.name for p in out.iterdir() if p.name not in known and not p.name.startswith("."))
        if other:
            raise ModelError(f"{out}: not empty and not an earlier export ({', '.join(other[:3])}); "
                             "choose an empty or new folder")


def export_checkpoint(checkpoint: str | Path, out: str | Path, onnx: bool = False,
                      check_images: str | Path | None = None, format: str | None = None,
                      quantize: str | None = None) -> dict:
    """Export a clipft checkpoint to `out` (see the module docstring). Returns {"files": [(path,
    bytes)], "onnx_max_abs_diff": float or None, "open_clip": None if that form was written, else
    why not}. format="open_clip" makes the whole open_clip model required (refused in one line
    when it does not map); quantize="int8" (with onnx) adds image_tower.int8.onnx.
    ModelError (one line) for anything refused."""
    from safetensors.torch import save_file

    from . import export_open_clip as OC

    from .modelcard import write_model_card
    ckpt_path, out = Path(checkpoint), Path(out)
    if format not in (None, "clipft", "open_clip"):
        raise ModelError(f"--format must be clipft or open_clip, got {format!r}")
    if quantize and not onnx:
        raise ModelError("--quantize int8 needs --onnx: it quantizes the float ONNX image tower")
    ckpt = read_checkpoint(ckpt_path)
    cfg = ckpt.get("config")
    if not isinstance(cfg, dict) or not {"data", "text", "model"} <= set(cfg):
        raise ModelError(f"{ckpt_path}: the checkpoint records no training config (data, text and model settings)")
    tower = tower_from_checkpoint(ckpt)
    _check_out_dir(out)
    check_paths = None
    if onnx:  # before the text encoder and the minutes of exporting: the packages, and images to check on
        check_onnx_tools()
        check_paths = parity_images(ckpt_path, cfg, check_images)
    text = _text_encoder_entry(cfg, tower.embed_dim)
    source = {"checkpoint": ckpt_path.name, "epoch": ckpt.get("epoch"), "best_epoch": ckpt.get("best_epoch")}
    config = export_config(tower, cfg, text, source)
    out.mkdir(parents=True, exist_ok=True)
    diff = None
    if onnx:
        # First, and under a temporary name: a refused ONNX file leaves nothing behind.
        tmp = out / (ONNX_FILE + ".tmp")
        try:
            export_onnx(tower, tmp, config["image_size"])
            probe = load(ckpt_path)
            diff = onnx_parity(tower, tmp, _parity_pixels(probe, check_paths))
        except Exception:
            tmp.unlink(missing_ok=True)
            raise
        if not diff <= ONNX_TOLERANCE:
            tmp.unlink(missing_ok=True)
            raise ModelError(f"{out / ONNX_FILE}: refused, onnxruntime differs from PyTorch by {diff:.2e} "
                             f"(max abs, > {ONNX_TOLERANCE:g}) on real images")
        config["files"]["onnx"] = ONNX_FILE
        os.chmod(tmp, _umask_mode())
        # The file's bytes, checked by `load(..., backend="onnx")`: a file altered after this check is refused.
        config["onnx"] = {"input": "pixel_values", "output": "image_embeds", "max_abs_diff": diff,
                          "checked_images": PARITY_IMAGES, "sha256": file_sha256(tmp)}
    # The whole open_clip model (clipft.export_open_clip) and the int8 ONNX file (clipft.quantize) are
    # staged and checked before anything is written into `out`; a refusal removes every staged file.
    stage = quant_tmp = None
    try:
        stage, config["open_clip"] = OC.prepare_open_clip(out, tower, config, _open_clip_pixels(
            ckpt_path, cfg, check_images, config["image_size"]), required=format == "open_clip")
        if stage is not None:
            config["files"].update(open_clip_config=OC.OPEN_CLIP_CONFIG, open_clip_weights=OC.OPEN_CLIP_WEIGHTS)
        if quantize:
            from .quantize import prepare_quantized
            quant_tmp, config["onnx_int8"] = prepare_quantized(
                out, ckpt_path, cfg, check_images, quantize, onnx_tmp=out / (ONNX_FILE + ".tmp") if onnx else None)
            config["files"]["onnx_int8"] = config["onnx_int8"]["file"]
    except BaseException:
        OC.discard(stage)
        (out / (ONNX_FILE + ".tmp")).unlink(missing_ok=True)
        raise
    state = {k: v.detach().contiguous() for k, v in tower.state_dict().items()}
    _atomic_write(out / WEIGHTS_FILE, lambda p: save_file(state, str(p), metadata={"format": "pt"}))
    _atomic_write(out / CONFIG_FILE, lambda p: p.write_text(json.dumps(config, indent=2) + "\n"))
    _atomic_write(out / CARD_FILE, lambda p: write_model_card(p, ckpt, ckpt_path, config, out.name))
    if onnx:
        os.replace(out / (ONNX_FILE + ".tmp"), out / ONNX_FILE)
    else:
        (out / ONNX_FILE).unlink(missing_ok=True)  # an earlier export's file would not match these weights
    names = [WEIGHTS_FILE, CONFIG_FILE, CARD_FILE] + ([ONNX_FILE] if onnx else [])
    staged = OC.commit_open_clip(stage, out)
    for stale in (OPEN_CLIP_WEIGHTS, OPEN_CLIP_CONFIG):  # the image-tower-only form of earlier versions
        (out / stale).unlink(missing_ok=True)
    from .quantize import commit_quantized
    staged += commit_quantized(quant_tmp, out)
    for name in staged:
        os.chmod(out / name, _umask_mode())  # like every other file of the folder
    names += staged
    return {"files": [(out / n, (out / n).stat().st_size) for n in names], "onnx_max_abs_diff": diff,
            "open_clip": None if stage is not None else config["open_clip"]["reason"],
            "onnx_int8": config.get("onnx_int8")}


def _open_clip_pixels(ckpt_path: Path, cfg: dict, check_images, image_size: int) -> torch.Tensor:
    """Pixels for the open_clip check: real images (as the ONNX check takes them) where available,
    else a fixed draw of normalised noise [PARITY_IMAGES, 3, S, S]."""
    try:
        return _parity_pixels(load(ckpt_path), parity_images(ckpt_path, cfg, check_images))
    except ModelError:
        if check_images is not None:
            raise
        return torch.randn(PARITY_IMAGES, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))


def format_size(n: int) -> str:
    """1234567 -> '1.2 MB' (decimal units, like the hub shows)."""
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"
