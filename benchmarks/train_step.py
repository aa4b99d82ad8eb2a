"""Images/s of the full training step (ResNet50 + head, loss, backward, clip, AdamW): clipft's
`step.train_step` (bf16 autocast + channels_last on CUDA, optional torch.compile) against a plain
fp32 NCHW step, same model, same batch, same process.

On a CPU both paths run fp32 NCHW (AMP and channels_last are CUDA features here), so the ratio is ~1
by design; the figure that matters comes from a GPU machine:

    python benchmarks/train_step.py                       # CPU: batch 8, 224 px
    python benchmarks/train_step.py --batch 256 --compile # GPU
"""

from __future__ import annotations

import argparse
import time

import torch

from clipft.config import ModelConfig
from clipft.loss import clip_loss
from clipft.model import build_image_tower
from clipft.runtime import amp_dtype_for
from clipft.step import train_step
from clipft.train import build_optimizer


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def images_per_s(step, steps: int, batch: int, device: torch.device) -> float:
    """Time `steps` calls of `step` (already warmed up), waiting for the device at both ends."""
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return steps * batch / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=None, help="default: 256 on CUDA, 8 on CPU")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--steps", type=int, default=None, help="timed steps (default: 20 on CUDA, 3 on CPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile clipft's model (train.compile)")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batch = args.batch or (256 if device.type == "cuda" else 8)
    steps = args.steps or (20 if device.type == "cuda" else 3)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    cfg = ModelConfig(backbone="resnet50", image_weights="none", head_hidden=1024)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, args.size, args.size, generator=g)
    texts = torch.nn.functional.normalize(torch.randn(batch, 512, generator=g), dim=-1)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"torch {torch.__version__} on {name}; ResNet50 + head, {args.size} px, batch {batch}, {steps} timed steps")

    # Plain step: fp32, NCHW, no scaler.
    torch.manual_seed(0)
    model = build_image_tower(cfg, 512).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, t = images.to(device), texts.to(device)

    def plain() -> None:
        loss = clip_loss(model(x), t, model.logit_scale.exp())["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()

    plain()  # warm-up
    base = images_per_s(plain, steps, batch, device)
    print(f"plain fp32 NCHW step: {base:8.1f} img/s")
    del model, opt

    # clipft's step, with what `clipft train` sets up on this device.
    torch.manual_seed(0)
    amp = amp_dtype_for(device, True)
    channels_last = device.type == "cuda"
    model = build_image_tower(cfg, 512).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    step_model = torch.compile(model) if args.compile else model
    opt = build_optimizer(model, 1e-4, 0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    micro = [(images.pin_memory() if device.type == "cuda" else images, texts)]

    def ours() -> dict:
        return train_step(step_model, micro, opt, sched, scaler, amp, 1.0, channels_last=channels_last)

    for _ in range(3 if args.compile else 1):  # warm-up; compilation happens in the first calls
        ours()
    fast = images_per_s(ours, steps, batch, device)
    print(f"clipft train_step ({'bf16/fp16 autocast, channels_last' if amp else 'fp32'}"
          f"{', compiled' if args.compile else ''}): {fast:8.1f} img/s ({fast / base:.2f}x)")


if __name__ == "__main__":
    main()
