"""Use a trained model: `load` an export folder, a checkpoint or an original CLIP, then embed.

    import clipft
    m = clipft.load("DIR")                        # clipft export folder, best.pt, or an HF CLIPModel
    img = m.encode_images(["a.jpg", pil_image])   # [N, D] float32 CPU, L2-normalised
    txt = m.encode_texts(["a dog on a beach"])    # the frozen text encoder the tower was trained against

Images go through exactly the evaluation-time preprocessing (`clipft.preprocess`, the same pixels
as `clipft evaluate`), so embeddings equal the `--save-embeddings` output. An original CLIP
(`load("openai/clip-vit-base-patch32")` or a CLIPModel directory) gets the same interface over its
own image processor and towers, so search and comparisons treat a fine-tune and CLIP alike.

This module imports nothing of training: no trainer, loss, optimizer set-up or dataset loader.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from .text.encoder import text_fingerprint  # noqa: F401 (part of this module's interface)
from .config import ConfigError
from .backbones import file_sha256  # noqa: F401 (export and quantize import it from here)
from .model import ModelError
from .preprocess import EvalTransform, ProcessorTransform, pil_from_uint8, preprocess_file, to_rgb

log = logging.getLogger(__name__)

EXPORT_FORMAT = "clipft-image-tower"
EXPORT_FORMAT_VERSION = 1
CONFIG_FILE, WEIGHTS_FILE, ONNX_FILE = "config.json", "model.safetensors", "image_tower.onnx"
INT8_ONNX_FILE = "image_tower.int8.onnx"  # clipft export --onnx --quantize int8 (clipft.quantize)
BACKENDS = ("torch", "onnx")
# What `read_export_config` needs in config.json (export.export_config writes more, for people).
EXPORT_KEYS = ("model_config", "embed_dim", "image_size", "mean", "std", "logit_scale", "text_encoder")


def similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every row of a [Na, D] with every row of b [Nb, D] -> [Na, Nb] float32 (tensors,
    or NumPy arrays / nested lists of embeddings stored elsewhere; a single embedding [D] counts as [1, D])."""
    a, b = _as_embeddings(a), _as_embeddings(b)
    # One embedding [D] (what encode_texts("a dog") returns) is one row [1, D], as sentence-transformers'
    # cos_sim takes it: the result stays [Na, Nb].
    a, b = (x[None] if x.ndim == 1 else x for x in (a, b))
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"expected [Na, D] and [Nb, D] embeddings, got {tuple(a.shape)} and {tuple(b.shape)}")
    return F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T


def _as_embeddings(x: Any) -> torch.Tensor:
    """A tensor as it is; a NumPy array or nested list (embeddings saved elsewhere) as a tensor."""
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, (str, bytes)) or not hasattr(x, "__len__"):
        raise TypeError(f"similarity takes embeddings ([N, D] tensors from encode_images / encode_texts), "
                        f"got {type(x).__name__}")
    return torch.as_tensor(x)


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, shape, dtype and exact bytes (sorted by name): the same for
    a checkpoint's tower and its export, different for any changed weight."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}:{tuple(state[name].shape)}:{t.dtype};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def fill_template(template: str, label: str) -> str:
    """template.format(label), with "a {}" turned into "an {}" before a vowel ("an orange star"): the
    prompt rule of `clipft zeroshot` (which imports it from here; the API imports nothing of data)."""
    if "{}" not in template:
        raise ConfigError(f"zero-shot template {template!r} has no '{{}}' for the class name")
    if label[:1].lower() in "aeiou":
        template = re.sub(r"\b([Aa]) \{\}", r"\1n {}", template)
    return template.format(label)


class _TextSide:
    """The frozen text encoder, loaded on first use (image-only users never pay for it)."""

    def __init__(self, name: str, max_length: int, device: torch.device, embed_dim: int,
                 expected_fingerprint: str | None = None, amp: str = "off"):
        self.name, self.max_length, self.device, self.embed_dim = name, max_length, device, embed_dim
        self.amp = amp
        self.expected = expected_fingerprint
        self._encoder = None

    def encoder(self):
        if self._encoder is None:
            from .text import load_text_encoder
            enc = load_text_encoder(self.name, device=self.device, max_length=self.max_length, amp=self.amp)
            if enc.dim != self.embed_dim:
                raise ModelError(f"text encoder {self.name!r} gives {enc.dim}-d embeddings, the image tower "
                                 f"{self.embed_dim}-d: not the encoder it was trained against")
            if self.expected and text_fingerprint(enc) != self.expected:
                log.warning("text encoder %s differs from the one this model was trained against (name, config "
                            "or weights changed): text embeddings may not match the images", self.name)
            self._encoder = enc
        return self._encoder

    def fingerprint(self) -> str:
        return self.expected or text_fingerprint(self.encoder())

    def move(self, device: torch.device) -> None:
        """Embed on `device` from now on (a loaded encoder is moved, an unloaded one loads there)."""
        self.device = device
        if self._encoder is not None:
            self._encoder.module.to(device)
            self._encoder.device = device


class ImageTextModel:
    """An image tower and its frozen text encoder behind one interface (see `load`).

    name, embed_dim, image_size, logit_scale (1/tau, for zero-shot probabilities), device, backend,
    and fingerprint: a stable hex id of the image weights, the preprocessing and the text encoder
    (a checkpoint and its export share it; computing it loads the text encoder once unless an
    export folder recorded the encoder's fingerprint).
    """

    def __init__(self, name: str, embed_dim: int, image_size: int, preprocess: Callable[[Image.Image], torch.Tensor],
                 encode_pixels: Callable[[torch.Tensor], torch.Tensor], text: _TextSide, logit_scale: float,
                 device: torch.device, backend: str, image_digest: str, preprocess_id: dict,
                 draft_size: int | None):
        self.name, self.embed_dim, self.image_size = name, int(embed_dim), int(image_size)
        self.preprocess = preprocess  # PIL RGB -> [3, image_size, image_size] float (picklable)
        self.draft_size = draft_size  # JPEG draft decoding of files, exactly as evaluation does
        self._encode_pixels = encode_pixels
        self._text = text
        self.logit_scale = float(logit_scale)
        self.device, self.backend = device, backend
        self.quantized = False  # True: the int8 ONNX image tower (clipft export --onnx --quantize int8)
        self._image_digest, self._preprocess_id = image_digest, preprocess_id
        self._fingerprint: str | None = None

    def __repr__(self) -> str:
        return (f"ImageTextModel({self.name!r}, embed_dim={self.embed_dim}, image_size={self.image_size}, "
                f"backend={self.backend!r}, device={str(self.device)!r})")

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            blob = json.dumps({"image_weights": self._image_digest, "preprocess": self._preprocess_id,
                               "text_encoder": self._text.fingerprint()}, sort_keys=True, default=str)
            self._fingerprint = hashlib.sha256(blob.encode()).hexdigest()
        return self._fingerprint

    @property
    def text_encoder_name(self) -> str:
        return self._text.name

    def pixels(self, image: Any) -> torch.Tensor:
        """One image (path, PIL image, uint8 [3, H, W] or normalised float [3, S, S]) -> [3, S, S]."""
        if isinstance(image, (str, Path)):
            pixels, reason = preprocess_file(image, self.preprocess, self.draft_size)  # what embed/index do
            if pixels is None:
                hint = ("; a folder is embedded by `clipft embed --images FOLDER` or clipft.embed.embed_folder"
                        if Path(image).is_dir() else "")
                raise ValueError(f"{image}: cannot use this image ({reason}){hint}")
            return pixels
        if isinstance(image, Image.Image):
            return self.preprocess(to_rgb(image))
        if isinstance(image, torch.Tensor):
            if image.dtype == torch.uint8:
                return self.preprocess(pil_from_uint8(image))
            if image.is_floating_point() and tuple(image.shape) == (3, self.image_size, self.image_size):
                return image.float()  # already preprocessed pixel_values
            raise ValueError(f"a {image.dtype} tensor {tuple(image.shape)}: pass uint8 pixels [3, H, W] or "
                             f"preprocessed float pixel_values [3, {self.image_size}, {self.image_size}]")
        raise ValueError(f"cannot embed a {type(image).__name__}: pass paths, PIL images or tensors")

    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """Preprocessed pixel_values [B, 3, S, S] -> L2-normalised embeddings [B, D] float32 CPU."""
        if pixels.shape[0] == 0:
            return torch.zeros(0, self.embed_dim)
        with torch.inference_mode():
            out = self._encode_pixels(pixels.float())
        return out.clone()  # a plain tensor, outside inference mode

    def _is_one_image(self, images: Any) -> bool:
        """A single path, PIL image or [3, H, W] tensor (not a list of them, nor a [B, 3, H, W] batch)."""
        return (isinstance(images, (str, Path, Image.Image))
                or (isinstance(images, torch.Tensor) and images.ndim == 3))

    def encode_images(self, images: Any, batch_size: int = 64, normalize: bool = True,
                      convert_to_numpy: bool = False, show_progress: bool | None = None,
                      as_numpy: bool | None = None) -> Any:
        """[N, D] float32 CPU embeddings of paths, PIL images or tensors (a [B, 3, H, W] tensor counts
        as B images), with the evaluation-time preprocessing, `batch_size` at a time.

        One image (a path, a PIL image, a [3, H, W] tensor) gives one [D] vector, as sentence-transformers
        does for one input. normalize: L2-normalise the result (default True; the towers already return
        unit vectors, so False returns the same numbers without the extra division). convert_to_numpy
        (or its alias as_numpy): a float32 NumPy array instead of a tensor. show_progress: a progress
        bar over the batches (default: only for more than 8 batches)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        one = self._is_one_image(images)
        if one:
            items = [images]
        elif isinstance(images, torch.Tensor) and images.ndim == 4:
            items = list(images.unbind(0))
        else:
            items = list(images)
        starts = _batches(len(items), batch_size, show_progress, "images")
        out = [self.encode_pixels(torch.stack([self.pixels(x) for x in items[s:s + batch_size]])) for s in starts]
        emb = torch.cat(out) if out else torch.zeros(0, self.embed_dim)  # [N, D]
        return _finish(emb, one, normalize, convert_to_numpy or bool(as_numpy))

    def encode_texts(self, texts: str | Sequence[str], batch_size: int = 256, normalize: bool = True,
                     convert_to_numpy: bool = False, show_progress: bool | None = None,
                     as_numpy: bool | None = None) -> Any:
        """[N, D] float32 CPU embeddings from the frozen text encoder; one string gives one [D] vector.
        normalize, convert_to_numpy / as_numpy, show_progress: as in `encode_images`."""
        one = isinstance(texts, str)
        texts = [texts] if one else list(texts)
        encoder = self._text.encoder()
        step = max(1, int(batch_size))
        starts = _batches(len(texts), step, show_progress, "texts")
        out = [encoder.encode(texts[s:s + step], batch_size=step) for s in starts]
        emb = torch.cat(out) if out else torch.zeros(0, self.embed_dim)  # [N, D]
        return _finish(emb, one, normalize, convert_to_numpy or bool(as_numpy))

    def similarity(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Cosine similarity [Na, Nb] of two sets of embeddings."""
        return similarity(a, b)

    def to(self, device: str | torch.device) -> "ImageTextModel":
        """Move the image tower and the text encoder to `device` (in place; returns self, like
        nn.Module.to). The ONNX backend stays on the CPU."""
        dev = _device(device)
        if self.backend == "onnx" and dev.type != "cpu":
            raise ModelError(f"backend='onnx' runs on CPU; got device {str(device)!r}")
        if isinstance(self._encode_pixels, _TorchTower):
            self._encode_pixels.move(dev)
        self._text.move(dev)
        self.device = dev
        return self

    def zero_shot(self, images: Any, classnames: Sequence[str],
                  templates: Sequence[str] | None = None) -> torch.Tensor:
        """[N, C] class probabilities: softmax(1/tau x cosine) against each class's prompts, averaged
        over `templates` ("{}" = the class name) and renormalised, as `clipft zeroshot` does. The
        default templates are `clipft zeroshot`'s (eval.zeroshot_templates of the default config)."""
        from .config import EvalConfig
        if isinstance(classnames, str):  # list("red") would be the classes r, e, d
            raise ValueError(f"zero_shot: classnames must be a list of class names, got the string {classnames!r} "
                             "(e.g. ['cat', 'dog'])")
        classnames = list(classnames)
        templates = [templates] if isinstance(templates, str) else templates  # one template, not its characters
        templates = list(EvalConfig().zeroshot_templates if templates is None else templates)
        if not classnames or not templates:
            raise ValueError("zero_shot needs at least one class name and one template")
        prompts = [fill_template(t, c) for c in classnames for t in templates]
        cls = self.encode_texts(prompts).reshape(len(classnames), len(templates), -1).mean(1)  # [C, D]
        img = self.encode_images(images)  # [N, D] ([D] for one image)
        return (self.logit_scale * img @ F.normalize(cls, dim=-1).T).softmax(dim=-1)


PROGRESS_MIN_BATCHES = 8  # show_progress=None: a bar only for inputs longer than this many batches


def _batches(n: int, batch_size: int, show_progress: bool | None, what: str):
    """The start index of each batch of `n` items, through a tqdm bar when asked (or when long)."""
    starts = range(0, n, batch_size)
    if show_progress is None:
        show_progress = len(starts) > PROGRESS_MIN_BATCHES
    if not show_progress:
        return starts
    from tqdm.auto import tqdm
    return tqdm(starts, desc=f"embedding {n} {what}", unit="batch")


def _finish(emb: torch.Tensor, one: bool, normalize: bool, numpy: bool) -> Any:
    """[N, D] -> normalised, [D] for a single input, NumPy on request."""
    if normalize and emb.numel():
        emb = F.normalize(emb, dim=-1)
    if one:
        emb = emb[0]
    return emb.numpy() if numpy else emb


# --------------------------------------------------------------------------- loading

def _device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):  # torch's own line lists twenty device types
        raise ModelError(f"device {str(device)!r}: not a device (expected 'cpu', 'cuda', 'cuda:N' or 'mps')") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"device {str(device)!r}: CUDA is not available on this machine; use device='cpu'")
    return dev


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ModelError(f"{path}: not a readable JSON file ({type(e).__name__})") from None
    if not isinstance(value, dict):
        raise ModelError(f"{path}: expected a JSON object")
    return value


def _run_dir_error(path: Path) -> ModelError:
    return ModelError(f"{path}: a training run directory, not a model; load {path / 'best.pt'} (the checkpoint "
                      f"chosen on validation) or export it: clipft export {path / 'best.pt'} --out DIR")


def load(source: str | Path, device: str | torch.device = "cpu", backend: str = "torch",
         amp: str = "off", quantized: bool = False, text_encoder: str | None = None) -> ImageTextModel:
    """An ImageTextModel from an export folder (config.json + model.safetensors), a clipft checkpoint
    (best.pt / last.pt), or an HF CLIPModel (hub name or directory) as the original-CLIP baseline.
    backend="onnx" runs an export folder's image_tower.onnx with onnxruntime on CPU.
    amp: "off" (default) embeds in fp32, equal to `clipft evaluate --set train.amp=off` within 1e-5;
    "auto" / "bf16" use `train.amp`'s autocast (faster on CPUs with native bf16, ~1e-3 away), for
    the clipft checkpoints and exports on the torch backend and for the text encoder.
    quantized=True (with backend="onnx") runs the folder's image_tower.int8.onnx (`clipft export --onnx
    --quantize int8`); a path to an .onnx file inside an export folder picks that file (backend onnx).
    text_encoder: a query encoder used for encode_texts instead of the frozen one, accepted only when
    it declares the frozen encoder's output space (`query_encoder.use_query_encoder`).
    Bad input raises ModelError with one line naming the file and the problem."""
    model = _load(source, device, backend, amp, quantized)
    if text_encoder is not None:
        from .query_encoder import use_query_encoder
        use_query_encoder(model, text_encoder)
    return model


def _load(source: str | Path, device: str | torch.device = "cpu", backend: str = "torch",
          amp: str = "off", quantized: bool = False) -> ImageTextModel:
    from .config import ConfigError
    from .runtime import select_precision
    onnx_file = None
    path = Path(source).expanduser()
    if path.suffix == ".onnx":  # one ONNX file of an export folder: that file, on the onnx backend
        if not path.is_file():
            raise ModelError(f"{path}: not found")
        if not (path.parent / CONFIG_FILE).is_file():
            raise ModelError(f"{path}: an .onnx model must sit in a folder written by clipft export (no "
                             f"{CONFIG_FILE} beside it)")
        source, backend, onnx_file = path.parent, "onnx", path.name
    elif quantized:
        if backend != "onnx":
            raise ModelError("quantized=True runs the int8 ONNX image tower: pass backend='onnx'")
        onnx_file = INT8_ONNX_FILE
    if backend not in BACKENDS:
        raise ModelError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    dev = _device(device)
    try:
        select_precision(dev, amp)  # an unknown or impossible mode: one line, before anything loads
    except ConfigError as e:
        raise ModelError(str(e).replace("train.amp", "amp")) from None
    if backend == "onnx" and dev.type != "cpu":
        raise ModelError(f"backend='onnx' runs on CPU; got device {str(device)!r} (use backend='torch' there)")
    path = Path(source).expanduser()
    if onnx_file and not path.is_dir():
        raise ModelError(f"{path}: quantized=True needs an export folder with {INT8_ONNX_FILE} "
                         f"(clipft export CKPT --out DIR --onnx --quantize int8)")
    if path.is_file():
        if backend == "onnx":
            raise ModelError(f"{path}: the onnx backend needs an export folder with {ONNX_FILE} "
                             f"(clipft export {path} --out DIR --onnx)")
        return _from_checkpoint(path, dev, amp)
    if path.is_dir():
        cfg_file = path / CONFIG_FILE
        is_run = (path / "best.pt").is_file() or (path / "last.pt").is_file()
        if not cfg_file.is_file():
            if is_run:
                raise _run_dir_error(path)
            raise ModelError(f"{path}: no {CONFIG_FILE} (not a folder written by clipft export, nor a CLIPModel "
                             "directory)")
        cfg = _read_json(cfg_file)
        if cfg.get("format") == EXPORT_FORMAT:
            return _from_export(path, dev, backend, amp, onnx_file)
        if is_run or {"train", "model", "data"} <= set(cfg):
            raise _run_dir_error(path)
        if cfg.get("model_type") == "clip":
            return _from_hf_clip(str(path), dev, backend, amp)
        raise ModelError(f"{cfg_file}: neither a clipft export (format {EXPORT_FORMAT!r}) nor a CLIPModel config "
                         f"(model_type 'clip'), got model_type {cfg.get('model_type')!r}")
    text = str(source)
    from .hub import names_local_path
    if names_local_path(text):
        raise ModelError(f"{source}: not found (expected an export folder, a checkpoint, or an HF CLIP model name)")
    return _from_hf_clip(text, dev, backend, amp)


class _TorchTower:
    """Pixels [B, 3, S, S] -> embeddings [B, D] float32 CPU, under `train.amp`'s autocast for `amp`
    (runtime.select_precision: none for "off"), channels_last where autocast runs, like evaluation."""

    def __init__(self, tower: torch.nn.Module, dev: torch.device, amp: str):
        from .runtime import select_precision
        self.tower = tower.to(dev).eval()
        self.tower.requires_grad_(False)
        self.dev, self.precision, self.amp = dev, select_precision(dev, amp), amp

    def move(self, dev: torch.device) -> None:
        from .runtime import select_precision
        self.tower = self.tower.to(dev)
        self.dev, self.precision = dev, select_precision(dev, self.amp)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        dtype = self.precision.dtype
        x = pixels.to(self.dev)
        if dtype is not None and self.precision.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.dev.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            return self.tower(x).float().cpu()  # [B, D], L2-normalised by the tower


def _torch_tower(tower: torch.nn.Module, dev: torch.device, amp: str = "off") -> Callable[[torch.Tensor], torch.Tensor]:
    return _TorchTower(tower, dev, amp)


def _amp_id(amp: str) -> dict:
    """The precision in the fingerprint: fp32 models keep the fingerprints they had before amp existed,
    and a bf16 index is never mixed with an fp32 one."""
    return {} if amp == "off" else {"amp": amp}


def _clipft_model(name: str, tower: Any, state: dict, image_size: int, mean: Sequence[float],
                  std: Sequence[float], text: _TextSide, dev: torch.device, backend: str,
                  encode: Callable[[torch.Tensor], torch.Tensor], amp: str = "off",
                  onnx_sha256: str | None = None) -> ImageTextModel:
    preprocess_id = {"kind": "clipft-eval", "image_size": int(image_size), "mean": [float(m) for m in mean],
                     "std": [float(s) for s in std], "jpeg_draft": int(image_size), **_amp_id(amp)}
    digest = state_digest(state)
    if onnx_sha256 is not None:  # the ONNX backend computes with the file, not the weights: its bytes count
        digest = hashlib.sha256(f"{digest}:onnx:{onnx_sha256}".encode()).hexdigest()
    return ImageTextModel(name, tower.embed_dim, image_size, EvalTransform(image_size, mean, std), encode, text,
                          float(tower.logit_scale.detach().exp()), dev, backend, digest, preprocess_id,
                          draft_size=int(image_size))


def _from_checkpoint(path: Path, dev: torch.device, amp: str = "off") -> ImageTextModel:
    from .model import read_checkpoint, tower_from_checkpoint
    ckpt = read_checkpoint(path)
    cfg = ckpt.get("config")
    if not isinstance(cfg, dict) or not {"data", "text"} <= set(cfg):
        raise ModelError(f"{path}: the checkpoint records no training config (data and text settings)")
    tower = tower_from_checkpoint(ckpt, source=str(path))
    ckpt_text = ckpt.get("text")
    del ckpt  # optimizer state: not needed
    d, t = cfg["data"], cfg["text"]
    # The encoder's fingerprint as training recorded it (runs since 0.2): an image-only use (clipft
    # index) then never loads the text encoder; older checkpoints load it once to compute it.
    recorded = [v.get("encoder_fingerprint") for v in (ckpt_text or {}).values() if isinstance(v, dict)]
    text = _TextSide(t["encoder"], int(t.get("max_length", 77)), dev, tower.embed_dim,
                     expected_fingerprint=next((f for f in recorded if isinstance(f, str) and f), None), amp=amp)
    state = tower.state_dict()
    return _clipft_model(str(path), tower, state, d["image_size"], d["mean"], d["std"], text, dev, "torch",
                         _torch_tower(tower, dev, amp), amp)


def read_export_config(folder: str | Path) -> dict:
    """config.json of an export folder, checked: ModelError naming the file on a missing file, another
    format or version, or missing entries."""
    folder = Path(folder)
    cfg_file = folder / CONFIG_FILE
    if not cfg_file.is_file():
        raise ModelError(f"{folder}: no {CONFIG_FILE} (not a folder written by clipft export)")
    cfg = _read_json(cfg_file)
    if cfg.get("format") != EXPORT_FORMAT:
        raise ModelError(f"{cfg_file}: not a clipft export config (format {cfg.get('format')!r})")
    version = cfg.get("format_version")
    if version != EXPORT_FORMAT_VERSION:
        raise ModelError(f"{cfg_file}: export format version {version!r} (written by clipft "
                         f"{cfg.get('clipft_version', '?')}); this clipft reads version {EXPORT_FORMAT_VERSION}")
    missing = [k for k in EXPORT_KEYS if k not in cfg]
    if missing:
        raise ModelError(f"{cfg_file}: missing {', '.join(missing)}")
    _check_export_values(cfg, cfg_file)
    return cfg


IMAGE_SIZE_RANGE = (16, 4096)  # the sides data.image_size accepts


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_export_values(cfg: dict, cfg_file: Path) -> None:
    """The values preprocessing and the tower are built from, in range: a bad one is a ModelError
    naming config.json and the entry, not a ValueError or MemoryError deep in resizing."""
    lo, hi = IMAGE_SIZE_RANGE
    size = cfg["image_size"]
    if not (_finite(size) and float(size).is_integer() and lo <= size <= hi):
        raise ModelError(f"{cfg_file}: image_size {size!r} is not a whole number of pixels in [{lo}, {hi}]")
    cfg["image_size"] = int(size)
    for key in ("mean", "std"):
        v = cfg[key]
        if not (isinstance(v, list) and len(v) == 3 and all(_finite(x) for x in v)):
            raise ModelError(f"{cfg_file}: {key} {v!r} is not a list of 3 finite numbers (one per RGB channel)")
    if not all(s > 0 for s in cfg["std"]):
        raise ModelError(f"{cfg_file}: std {cfg['std']!r} has an entry <= 0 (pixels are divided by it)")
    dim = cfg["embed_dim"]
    if not (_finite(dim) and float(dim).is_integer() and dim >= 1):
        raise ModelError(f"{cfg_file}: embed_dim {dim!r} is not a positive whole number")
    if not (_finite(cfg["logit_scale"]) and cfg["logit_scale"] > 0):
        raise ModelError(f"{cfg_file}: logit_scale {cfg['logit_scale']!r} is not a positive finite number")


def read_export_weights(folder: Path) -> dict[str, torch.Tensor]:
    """model.safetensors of an export folder; ModelError for a missing, corrupt or truncated file."""
    from safetensors.torch import load_file
    path = folder / WEIGHTS_FILE
    if not path.is_file():
        raise ModelError(f"{path}: not found")
    try:
        return load_file(str(path), device="cpu")
    except Exception as e:  # safetensors raises its own error types for garbled or truncated files
        raise ModelError(f"{path}: not a readable safetensors file, corrupt or truncated "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})") from None


def tower_from_export(folder: str | Path, cfg: dict | None = None) -> torch.nn.Module:
    """The ImageTower of an export folder, in eval mode on CPU (`model.rebuild_tower`, as for a checkpoint)."""
    from .model import rebuild_tower
    folder = Path(folder)
    cfg = cfg or read_export_config(folder)
    state = read_export_weights(folder)
    return rebuild_tower(cfg["model_config"], cfg["embed_dim"], state, source=str(folder / WEIGHTS_FILE))


def _onnx_encoder(path: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    try:
        import onnxruntime as ort
    except ImportError:
        raise ModelError("backend='onnx' needs onnxruntime: pip install 'clipft[onnx]'") from None
    if not path.is_file():
        raise ModelError(f"{path}: not found (export with: clipft export CKPT --out DIR --onnx)")
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime's own error types for an invalid model file
        raise ModelError(f"{path}: not a loadable ONNX model ({type(e).__name__})") from None
    return lambda pixels: torch.from_numpy(
        session.run(["image_embeds"], {"pixel_values": pixels.contiguous().numpy()})[0]).float()


def _from_export(folder: Path, dev: torch.device, backend: str, amp: str = "off",
                 onnx_file: str | None = None) -> ImageTextModel:
    cfg = read_export_config(folder)
    tower = tower_from_export(folder, cfg)
    t = cfg["text_encoder"]
    text = _TextSide(t["name"], int(t.get("max_length", 77)), dev, tower.embed_dim,
                     t.get("fingerprint") if amp == "off" else None, amp=amp)
    onnx = backend == "onnx"
    onnx_path = folder / (onnx_file or ONNX_FILE)
    if onnx_file == INT8_ONNX_FILE and not onnx_path.is_file():
        raise ModelError(f"{onnx_path}: not found (export with: clipft export CKPT --out DIR --onnx --quantize int8)")
    encode = _onnx_encoder(onnx_path) if onnx else _torch_tower(tower, dev, amp)
    onnx_sha = _checked_onnx_sha256(folder, cfg, onnx_path.name) if onnx else None
    model = _clipft_model(folder.name or str(folder), tower, tower.state_dict(), cfg["image_size"], cfg["mean"],
                          cfg["std"], text, dev, backend, encode, "off" if onnx else amp, onnx_sha256=onnx_sha)
    if onnx and onnx_path.name != ONNX_FILE:
        # Not the float tower (int8 embeddings differ by ~1e-2): its file's sha256 is in the fingerprint
        # (above), so an index built with it is never mixed with the float model's. Outputs re-normalised.
        model._preprocess_id = {**model._preprocess_id, "onnx_file": onnx_path.name}
        model._encode_pixels = lambda pixels, f=encode: F.normalize(f(pixels), dim=-1)
        model.quantized = onnx_path.name == INT8_ONNX_FILE
    return model


def _checked_onnx_sha256(folder: Path, cfg: dict, name: str = ONNX_FILE) -> str:
    """sha256 of the export's ONNX file `name` (the float one, or the int8 one recorded under
    "onnx_int8"); ModelError when config.json recorded another one (the file was altered or replaced
    after `clipft export` checked it)."""
    path = folder / name
    got = file_sha256(path)
    entry = cfg.get("onnx") if name == ONNX_FILE else cfg.get("onnx_int8") if name == INT8_ONNX_FILE else None
    want = entry.get("sha256") if isinstance(entry, dict) else None
    if want is not None and got != want:
        raise ModelError(f"{path}: its sha256 {got[:12]}... is not the {str(want)[:12]}... {CONFIG_FILE} records: "
                         "altered or replaced after export; export again (clipft export CKPT --out DIR --onnx)")
    return got


class _ClipVision(torch.nn.Module):
    """CLIP's image side: vision transformer pooled output -> visual projection -> L2 norm."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.vision_model, self.visual_projection = model.vision_model, model.visual_projection

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        pooled = self.vision_model(pixel_values=pixel_values).pooler_output  # [B, H]
        return F.normalize(self.visual_projection(pooled).float(), dim=-1)  # [B, D]


def _from_hf_clip(name: str, dev: torch.device, backend: str, amp: str = "off") -> ImageTextModel:
    if backend != "torch":
        raise ModelError(f"{name}: backend={backend!r} is for clipft export folders; an HF CLIP model runs on torch")
    from transformers import CLIPImageProcessor, CLIPModel

    from .text import _quiet_transformers
    try:
        with _quiet_transformers():
            model = CLIPModel.from_pretrained(name)
            processor = CLIPImageProcessor.from_pretrained(name)
    except Exception as e:  # OSError / hub errors / wrong model type: all mean "not usable"
        first = str(e).splitlines()[0][:200] if str(e) else ""
        raise ModelError(f"{name}: could not load a CLIP model with its image processor ({type(e).__name__}: "
                         f"{first}); pass an export folder, a checkpoint, or a CLIPModel saved with "
                         "save_pretrained next to its preprocessor_config.json") from None
    vision = _ClipVision(model.float().eval())
    state = vision.state_dict()
    dim = int(model.config.projection_dim)
    size = processor.crop_size["height"] if getattr(processor, "crop_size", None) else processor.size["shortest_edge"]
    text = _TextSide(name, int(model.config.text_config.max_position_embeddings), dev, dim, amp=amp)
    encode = _torch_tower(vision, dev, amp)
    return ImageTextModel(name, dim, size, ProcessorTransform(processor), encode, text,
                          float(model.logit_scale.detach().exp()), dev, "torch", state_digest(state),
                          {"kind": "hf-clip", "processor": processor.to_dict(), **_amp_id(amp)}, draft_size=None)
