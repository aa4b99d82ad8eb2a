"""uint8 image batches -> normalised model input on the training device: resize, random resized crop
and flip of whole batches with one affine grid_sample, so only uint8 bytes cross to the device and the
decoding workers (or the prepared cache's reader) skip the per-image float work.
"""


import math
from typing import Sequence

import torch
import torch.nn.functional as F


class DeviceTransform(torch.nn.Module):
    """uint8 [B, S, S, 3] (any device) -> normalised float [B, 3, size, size] on that device.

    Eval: resize the square to `size` (bilinear, antialiased). Train with augment: per-sample random
    resized crop (scale range, aspect 3/4..4/3) and horizontal flip via one batched affine grid_sample.
    """

    def __init__(self, size: int, mean: Sequence[float], std: Sequence[float], augment: bool = False,
                 scale: tuple[float, float] = (0.5, 1.0), flip: bool = True):
        super().__init__()
        self.size, self.augment, self.scale, self.flip = size, augment, scale, flip
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1) * 255.0, persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1) * 255.0, persistent=False)

    @staticmethod
    def sample_keys(seed: int, epoch: int, indices: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """[B] int64 augmentation seeds of the samples `indices` (dataset rows) in `epoch`:
        `datasets.sample_seed`, the rule of the JPEG path too."""
        from .datasets import sample_seed
        return torch.tensor([sample_seed(seed, epoch, int(i)) for i in indices], dtype=torch.int64)

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None,
                keys: torch.Tensor | None = None) -> torch.Tensor:
        """keys [B] (`sample_keys`): each sample's crop and flip drawn from its own generator, so they
        depend on (seed, epoch, sample) only, not on the batch it came in or the RNG's state (an
        exact mid-epoch resume). Without keys: from `generator` (or the global CPU RNG)."""
        x = images.permute(0, 3, 1, 2)  # [B, 3, S, S] uint8, a channels_last view (no copy)
        if self.augment:
            x = self._random_resized_crop(x.float(), generator, keys)
        elif x.shape[-1] != self.size:
            # CPU: resize the uint8 batch itself (a vectorised uint8 kernel, ~10x the float one);
            # CUDA: in float, where the resize is cheap next to the model.
            x = x if x.device.type == "cpu" else x.float()
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
        return self._normalise(x)

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] (uint8 or float, NCHW or channels_last) -> float (x - mean) / std, same layout.

        On a channels_last tensor the channel is the innermost dim (size 3): broadcasting a
        [1, 3, 1, 1] mean there defeats vectorisation (~5x slower on CPU). So channels_last input is
        viewed as rows [B, H, W*3] and scaled by the per-channel constants tiled to length W*3."""
        b, c, h, w = x.shape
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            rows = x.permute(0, 2, 3, 1).float().view(b, h, w * c)  # [B, H, W*3], a fresh copy
            scale = (1.0 / self.std).view(c).repeat(w).to(rows.device)  # [W*3]: 1/std of each pixel's channel
            shift = (self.mean / self.std).view(c).repeat(w).to(rows.device)
            return rows.mul_(scale).sub_(shift).view(b, h, w, c).permute(0, 3, 1, 2)  # channels_last [B, 3, H, W]
        return x.float().sub_(self.mean.to(x.device)).div_(self.std.to(x.device))  # in place on the fresh copy

    @staticmethod
    def _draws(b: int, generator: torch.Generator | None, keys: torch.Tensor | None) -> torch.Tensor:
        """[B, 5] uniforms in [0, 1): area, log-ratio, centre x, centre y, flip of each sample; row k from
        torch.Generator().manual_seed(keys[k]) when keys are given (B tiny draws: ~10 us a sample)."""
        if keys is None:
            return torch.rand(b, 5, generator=generator)
        return torch.stack([torch.rand(5, generator=torch.Generator().manual_seed(int(k))) for k in keys.tolist()])

    def _random_resized_crop(self, x: torch.Tensor, generator: torch.Generator | None,
                             keys: torch.Tensor | None = None) -> torch.Tensor:
        # Crop parameters are drawn on the CPU (5 numbers a sample, tiny) so CPU generators seed them.
        b = x.shape[0]
        u = self._draws(b, generator, keys)  # [B, 5]
        lo, hi = self.scale
        area = lo + (hi - lo) * u[:, 0]  # crop area / image area
        ratio = torch.exp(math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * u[:, 1])
        w = torch.sqrt(area * ratio).clamp(max=1.0)  # crop width / image width
        h = torch.sqrt(area / ratio).clamp(max=1.0)
        cx = (u[:, 2] * 2 - 1) * (1 - w)  # centre in [-1+w, 1-w] (normalised coords)
        cy = (u[:, 3] * 2 - 1) * (1 - h)
        sign = torch.where(u[:, 4] < 0.5, -1.0, 1.0) if self.flip else torch.ones(b)
        theta = torch.zeros(b, 2, 3)
        theta[:, 0, 0], theta[:, 0, 2] = w * sign, cx
        theta[:, 1, 1], theta[:, 1, 2] = h, cy
        # CUDA: page-locked + non_blocking, since a plain .to() would wait for the GPU queue.
        theta = theta.pin_memory().to(x.device, non_blocking=True) if x.device.type == "cuda" else theta.to(x.device)
        grid = F.affine_grid(theta, [b, 3, self.size, self.size], align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
