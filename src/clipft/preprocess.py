"""The one image preprocessing rule of clipft, importable without the datasets, the trainer or torchvision.

Every path that turns an image file into model input uses the functions here: evaluation
(`data.load_image` + `data.build_transform(train=False)`), the prepared training cache
(`data.prepare`), the inference API (`clipft.inference`), `clipft export`'s ONNX check, `clipft embed`
/ `clipft index` and the search query (`search.query.embed_query_image`):

  1. decode (`decode_image`): the format sniffed from the bytes, JPEGs decoded with DCT draft scaling
     at the model's image size, any mode to RGB with transparency composited onto white (`to_rgb`);
  2. the centre square (side = short side) resized to image_size x image_size, bicubic with
     antialiasing, in one pass (`CenterSquareResize`);
  3. x / 255, then (x - mean) / std per channel (`EvalTransform`).

`preprocess_file` is steps 1-3 for a file. tests/test_preprocess.py checks that the paths give the
same pixels (a file used as a search query matches its indexed embedding; the prepared cache's
pixels equal the JPEG path's).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

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


def _open_image_file(path: str | Path):
    """The image file, or a webdataset shard member named 'SHARD.tar/KEY.jpg' (`data.shards`)."""
    if ".tar/" in str(path):
        from .shard_members import open_member, split_member
        if split_member(path) is not None:
            return open_member(path)
    return open(path, "rb")


def decode_image(path: str | Path, draft_size: int | None = None) -> tuple[Image.Image | None, str | None]:
    """(RGB image, None), or (None, reason) for a file that cannot be used ("missing",
    "unreadable: ...", "truncated: ...", "undecodable: ..."). The format is sniffed from the content;
    a GIF gives its first frame. With draft_size, JPEGs decode at the smallest DCT scale whose sides
    stay >= draft_size. Never raises for a bad file and logs nothing: callers count and report."""
    try:
        # Open the file ourselves: closing a PIL-owned handle would also destroy the pixels.
        with _open_image_file(path) as f:
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


class CenterSquareResize:
    """PIL image -> its centre square (side = short side) resized to size x size, bicubic with
    antialiasing: the picture of Resize(size) + CenterCrop(size), in one resampling pass that only
    computes the kept pixels (Pillow's `resize(box=...)`). For a 320x240 draft-decoded COCO photo
    that is 0.75x the work of resizing the whole image first, and one pass instead of two. The only
    evaluation geometry: `EvalTransform`, `data.build_transform` and the prepared cache use it."""

    def __init__(self, size: int):
        self.size = int(size)

    def __call__(self, img: Image.Image) -> Image.Image:
        w, h = img.size
        side = min(w, h)
        left, top = (w - side) / 2, (h - side) / 2  # fractional: Pillow resamples sub-pixel boxes exactly
        return img.resize((self.size, self.size), Image.BICUBIC, box=(left, top, left + side, top + side),
                          reducing_gap=None)

    def __repr__(self) -> str:
        return f"CenterSquareResize(size={self.size})"


def normalize_pixels(img: Image.Image, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """PIL RGB [H, W] -> float [3, H, W]: x / 255, then (x - mean) / std per channel. The same
    operations, in the same order and dtype, as torchvision's ToTensor + Normalize (bit-identical,
    tests/test_preprocess.py), without importing torchvision."""
    arr = torch.from_numpy(np.array(img, dtype=np.uint8, copy=True))  # [H, W, 3] uint8
    x = arr.permute(2, 0, 1).contiguous().to(dtype=torch.float32).div(255)  # [3, H, W]
    m = torch.as_tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32).view(-1, 1, 1)
    return x.sub_(m).div_(s)


class EvalTransform:
    """PIL RGB image -> normalised float tensor [3, size, size]: `CenterSquareResize(size)`, then
    `normalize_pixels`. The same pixels as `data.build_transform(size, mean, std, train=False)`.
    A class, so it pickles into DataLoader workers."""

    def __init__(self, size: int, mean: Sequence[float], std: Sequence[float]):
        self.size = int(size)
        self.square = CenterSquareResize(self.size)
        self.mean = [float(m) for m in mean]
        self.std = [float(s) for s in std]

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return normalize_pixels(self.square(img), self.mean, self.std)  # [3, size, size]

    def __repr__(self) -> str:
        return f"EvalTransform(size={self.size}, mean={self.mean}, std={self.std})"


class ProcessorTransform:
    """PIL image -> pixel_values [3, H, W] with a HF image processor (an original CLIP's own
    preprocessing: the inference API and `clipft evaluate --compare-zero-shot` use it). A class, so
    it pickles into DataLoader workers."""

    def __init__(self, processor: Any):
        self.processor = processor

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.processor(images=image, return_tensors="pt")["pixel_values"][0]


def preprocess_file(path: str | Path, transform: Callable[[Image.Image], torch.Tensor], draft_size: int | None
                    ) -> tuple[torch.Tensor | None, str | None]:
    """One image file -> (model input, None), or (None, reason) when it cannot be used: `decode_image`
    (draft decoding at draft_size) then `transform` (an `EvalTransform`, or a model's own). Never
    raises for a bad file: a pathological image (e.g. 0 px wide) is a reason too."""
    img, reason = decode_image(path, draft_size)
    if img is None:
        return None, reason
    try:
        return transform(img), None
    except Exception as e:  # noqa: BLE001 - a model's own transform (HF processor) has its own error types
        return None, f"undecodable: {type(e).__name__}: {e}"


def pil_from_uint8(t: torch.Tensor) -> Image.Image:
    """uint8 pixels [3, H, W] (torchvision.io.read_image's layout) -> PIL RGB image."""
    if t.dtype != torch.uint8 or t.ndim != 3 or t.shape[0] != 3:
        raise ValueError(f"expected uint8 pixels [3, H, W], got {t.dtype} {tuple(t.shape)}")
    return Image.fromarray(t.permute(1, 2, 0).contiguous().cpu().numpy())  # HxWx3 uint8 -> RGB
