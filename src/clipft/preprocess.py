"""Inference-time image preprocessing, importable without the datasets or the trainer.

A loaded model (`clipft.inference`) must not pull in clipft's dataset loaders, so the evaluation-time
path of `clipft.data` lives here in its inference form: decode to RGB (`decode_image`, with JPEG
draft decoding at the model's image size, as `evaluate.embed_images` does), then the centre
square resized bicubically and normalised (`EvalTransform`). tests/test_preprocess.py checks
that both give bit-identical tensors to `data.load_image` + `data.build_transform(train=False)`
on JPEG, PNG, palette, RGBA and 16-bit images, so the two paths cannot drift apart unseen.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision.transforms import functional as TF

# The image files clipft reads, everywhere: training data (clipft.data) and the search index
# (clipft.embed.list_images) use this one list, so a file that can be trained on is also indexed.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB: transparency composited onto white, high bit depths scaled to 8 bits."""
    if im.mode == "RGB":
        return im
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    if im.mode in ("I", "F") or im.mode.startswith("I;16"):
        # 16/32-bit grey (e.g. 16-bit PNG): PIL's own convert clips instead of rescaling.
        arr = np.asarray(im, dtype=np.float64)
        if im.mode == "F" and arr.size and np.nanmax(arr) <= 1.0:
            arr = arr * 255.0
        elif arr.size and np.nanmax(arr) > 255:
            arr = arr * (255.0 / 65535.0)
        arr = np.nan_to_num(np.clip(arr, 0, 255)).astype(np.uint8)
        return Image.fromarray(arr).convert("RGB")  # 2-D uint8 -> "L"
    return im.convert("RGB")  # L, 1, P, CMYK, YCbCr, ...


def decode_image(path: str | Path, draft_size: int | None = None) -> tuple[Image.Image | None, str | None]:
    """(RGB image, None), or (None, reason) for a file that cannot be used ("missing",
    "unreadable: ...", "truncated: ...", "undecodable: ..."). The format is sniffed from the content;
    a GIF gives its first frame. With draft_size, JPEGs decode at the smallest DCT scale whose sides
    stay >= draft_size. Never raises for a bad file and logs nothing: callers count and report."""
    try:
        # Open the file ourselves: closing a PIL-owned handle would also destroy the pixels.
        with open(path, "rb") as f:
            im = Image.open(f)
            if draft_size and im.format == "JPEG":
                im.draft("RGB", (draft_size, draft_size))
            im.load()
        return to_rgb(im), None
    except FileNotFoundError:
        return None, "missing"
    except (PermissionError, IsADirectoryError) as e:
        return None, f"unreadable: {e.strerror or e}"
    except Image.DecompressionBombError as e:
        return None, f"undecodable: {e}"
    except UnidentifiedImageError:
        return None, "undecodable: not a recognised image format"
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as e:
        msg = str(e) or type(e).__name__
        low = msg.lower()
        kind = "truncated" if "truncated" in low or "broken data stream" in low or isinstance(e, EOFError) \
            else "undecodable"
        return None, f"{kind}: {msg}"


class EvalTransform:
    """PIL RGB image -> normalised float tensor [3, size, size]: the centre square (side = short
    side) resized bicubically with antialiasing in one pass, then (x/255 - mean) / std. The same
    pixels as `data.build_transform(size, mean, std, train=False)`. A class, so it pickles into
    DataLoader workers."""

    def __init__(self, size: int, mean: Sequence[float], std: Sequence[float]):
        self.size = int(size)
        self.mean = [float(m) for m in mean]
        self.std = [float(s) for s in std]

    def __call__(self, img: Image.Image) -> torch.Tensor:
        w, h = img.size
        side = min(w, h)
        left, top = (w - side) / 2, (h - side) / 2  # fractional: Pillow resamples sub-pixel boxes exactly
        img = img.resize((self.size, self.size), Image.BICUBIC, box=(left, top, left + side, top + side),
                         reducing_gap=None)
        return TF.normalize(TF.to_tensor(img), self.mean, self.std)  # [3, size, size]

    def __repr__(self) -> str:
        return f"EvalTransform(size={self.size}, mean={self.mean}, std={self.std})"


def pil_from_uint8(t: torch.Tensor) -> Image.Image:
    """uint8 pixels [3, H, W] (torchvision.io.read_image's layout) -> PIL RGB image."""
    if t.dtype != torch.uint8 or t.ndim != 3 or t.shape[0] != 3:
        raise ValueError(f"expected uint8 pixels [3, H, W], got {t.dtype} {tuple(t.shape)}")
    return Image.fromarray(t.permute(1, 2, 0).contiguous().cpu().numpy())  # HxWx3 uint8 -> RGB
