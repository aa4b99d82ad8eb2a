"""A deterministic stand-in for `clipft.inference.ImageTextModel`, so search tests need no trained model.

Image embedding [8 + 48]: the fraction of pixels near each shapes palette colour (clipft.shapes.COLORS),
then a centred 4x4 RGB thumbnail at half weight; L2-normalised. A text embeds as the palette colours
its words name, so "red" ranks images by how much red they hold, and a resized or re-encoded copy
of an image embeds almost exactly like the original.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from clipft.data.shapes import COLORS

PALETTE = np.array(list(COLORS.values()), dtype=np.float32)  # [8, 3]
NAMES = list(COLORS)


class FakeModel:
    image_size = 32

    def __init__(self, fingerprint: str = "fake-1", fail_after: int | None = None):
        self.name = f"fake-colour-{fingerprint}"
        self.fingerprint = fingerprint
        self.embed_dim = len(NAMES) + 48
        self.fail_after = fail_after  # raise after this many images: a run killed half-way
        self.images_seen = 0

    draft_size = None

    @staticmethod
    def preprocess(im: Image.Image) -> torch.Tensor:
        """PIL RGB -> [3, 32, 32] float in 0..255 (a plain function: DataLoader workers pickle it)."""
        px = np.asarray(im.convert("RGB").resize((32, 32), Image.BILINEAR), dtype=np.float32)
        return torch.from_numpy(px).permute(2, 0, 1).contiguous()

    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, 32, 32] -> [B, D]."""
        if self.fail_after is not None and self.images_seen + len(pixels) > self.fail_after:
            raise KeyboardInterrupt("killed")
        self.images_seen += len(pixels)
        out = []
        for p in pixels:
            px = p.permute(1, 2, 0).numpy()  # [32, 32, 3]
            dist = np.linalg.norm(px[:, :, None, :] - PALETTE[None, None], axis=-1)  # [32, 32, 8]
            colour = (dist < 60).mean(axis=(0, 1))  # [8]
            thumb = px.reshape(4, 8, 4, 8, 3).mean(axis=(1, 3)).reshape(-1) / 255.0  # [48]
            out.append(np.concatenate([colour, 0.5 * (thumb - thumb.mean())]))
        emb = torch.tensor(np.stack(out), dtype=torch.float32) if out else torch.zeros(0, self.embed_dim)
        return torch.nn.functional.normalize(emb, dim=-1)

    def encode_images(self, images, batch_size: int = 64) -> torch.Tensor:
        pixels = []
        for im in images:
            if isinstance(im, (str, Path)):
                with Image.open(im) as f:
                    im = f.convert("RGB")
            pixels.append(self.preprocess(im))
        return self.encode_pixels(torch.stack(pixels) if pixels else torch.zeros(0, 3, 32, 32))

    def encode_texts(self, texts, batch_size: int = 256) -> torch.Tensor:
        emb = torch.zeros(len(texts), self.embed_dim)
        for i, t in enumerate(texts):
            for w in t.lower().replace(",", " ").split():
                if w in NAMES:
                    emb[i, NAMES.index(w)] = 1.0
            if emb[i].sum() == 0:
                emb[i, len(NAMES):] = 1.0  # no colour word: a fixed direction
        return torch.nn.functional.normalize(emb, dim=-1)


def draw(path: Path, colour: str, seed: int, size: int = 64, fmt: str | None = None) -> Path:
    """A distinct test photo: a light background with a big square of `colour` at a seeded place and
    a seeded speckle, so two draws never look alike."""
    rng = np.random.default_rng(seed)
    px = np.full((size, size, 3), 235, dtype=np.uint8)
    px += rng.integers(0, 15, size=(size, size, 1), dtype=np.uint8)
    x, y = rng.integers(0, size // 2, size=2)
    px[y:y + size // 2, x:x + size // 2] = COLORS[colour]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(px).save(path, format=fmt)
    return path
