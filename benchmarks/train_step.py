"""Images/s and peak memory of the full training step (image tower + head, loss, backward, clip, AdamW).

Precision (default): clipft's `step.train_step` in fp32 (`train.amp=off`) and with `train.amp=auto`
(bf16 autocast + channels_last on CUDA and on CPUs with native bf16, see `runtime.select_precision`)
against a plain fp32 NCHW step: same model, same batch, same process. The settings take turns for
--rounds rounds of --steps steps each and the median round is reported, so a machine shared with
other work slows them alike.

Chunked embedding (--chunks 0,64): the same step at a large batch with `train.embed_chunk` = each
value, one fresh process per value so that each one's peak memory is its own: peak RSS of the
process (CPU; `ru_maxrss`, which sees PyTorch's allocations, unlike tracemalloc) or
`torch.cuda.max_memory_allocated` (CUDA), and img/s (median of --rounds rounds).

    python benchmarks/train_step.py                                        # CPU: ResNet50, 224 px, batch 16
    python benchmarks/train_step.py --backbone resnet18 --size 64 --batch 128   # the demo's tower
    python benchmarks/train_step.py --backbone resnet18 --size 64 --batch 1024 --chunks 0,64
    python benchmarks/train_step.py --batch 256 --compile                  # GPU
    python benchmarks/train_step.py --batch 1024 --chunks 0,64             # GPU: ResNet50 224 px
    python benchmarks/train_step.py --backbone timm:convnext_tiny          # any timm model (model.backbone)

Towers (--towers resnet50,timm:convnext_tiny,...): one fresh process per tower (so each peak memory is
its own) with clipft's step in the default precision (train.amp=auto): parameters, train-step img/s,
peak memory (RSS on CPU, allocated on CUDA) and embedding img/s (eval forward under inference_mode,
batch --batch, the same precision as `clipft embed` on that device).

Recipe levers (--recipes baseline,bank1024,bankall,queue1024,siglip,ema): clipft's step with each
option of docs/recipe.md against the baseline, taking turns in ONE process (median round), plus
the device memory each option adds, counted exactly from the tensors it keeps (caption bank, image
queue, EMA copy; --bank-size captions of 512 dims, default 10,000 ~ the demo's cache), and the one-off
k-means time of data.batch_sampler=clustered on that bank.

    python benchmarks/train_step.py --backbone resnet18 --size 64 --batch 128 --recipes baseline,bank1024,bankall,queue1024,siglip,ema
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

if "--no-thread-plan" not in sys.argv:  # what `clipft` does before importing torch (clipft.threads)
    from clipft.threads import configure_cpu_threads
    configure_cpu_threads()

import torch

from clipft.config import ModelConfig
from clipft.loss import clip_loss
from clipft.model import build_image_tower
from clipft.runtime import select_precision
from clipft.train.step import train_step
from clipft.train.loop import build_optimizer


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds(step, steps: int, device: torch.device) -> float:
    """Wall time of `steps` calls of `step` (already warmed up), waiting for the device at both ends."""
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return time.perf_counter() - t0


def batch_for(args, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch, 3, args.size, args.size, generator=g)
    texts = torch.nn.functional.normalize(torch.randn(args.batch, 512, generator=g), dim=-1)
    return (images.pin_memory() if device.type == "cuda" else images), texts


def clipft_step(args, device: torch.device, amp: str, embed_chunk: int = 0):
    """clipft's step with what `clipft train` sets up for train.amp=`amp` on this device."""
    torch.manual_seed(0)
    prec = select_precision(device, amp)
    model = build_image_tower(ModelConfig(backbone=args.backbone, image_weights="none", head_hidden=1024),
                              512).to(device)
    if prec.channels_last:
        model = model.to(memory_format=torch.channels_last)
    step_model = torch.compile(model) if args.compile else model
    opt = build_optimizer(model, 1e-4, 0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    scaler = torch.amp.GradScaler(device.type, enabled=prec.dtype == torch.float16)
    micro = [batch_for(args, device)]
    kw = {"embed_chunk": embed_chunk} if embed_chunk else {}

    def step() -> None:
        train_step(step_model, micro, opt, sched, scaler, prec.dtype, 1.0, channels_last=prec.channels_last, **kw)
    step.setup_mb = peak_mb(device)  # model, optimizer and batch, before any step
    for _ in range(3 if args.compile else 1):  # warm-up; compilation happens in the first calls
        step()
    return step, prec


def peak_mb(device: torch.device) -> float:
    """Peak memory of this process so far: GPU memory allocated (CUDA) or resident set size (CPU)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def plain_step(args, device: torch.device):
    """A plain fp32 NCHW step: what a lab implementation writes."""
    torch.manual_seed(0)
    model = build_image_tower(ModelConfig(backbone=args.backbone, image_weights="none", head_hidden=1024),
                              512).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, t = (v.to(device) for v in batch_for(args, device))

    def step() -> None:
        loss = clip_loss(model(x), t, model.logit_scale.exp())["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
    step()  # warm-up
    return step


def precision_table(args, device: torch.device) -> None:
    steps = {"plain fp32 NCHW": plain_step(args, device)}
    steps["clipft train.amp=off"], _ = clipft_step(args, device, "off")
    steps["clipft train.amp=auto"], prec = clipft_step(args, device, "auto")
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.rounds):  # interleaved: the settings share the machine's slow and fast moments
        for name, step in steps.items():
            times[name].append(seconds(step, args.steps, device))
    base = args.batch * args.steps / statistics.median(times["plain fp32 NCHW"])
    print(f"auto = {prec.name}{' + channels_last' if prec.channels_last else ''} ({prec.reason})")
    print("| step | img/s (median of rounds) | vs plain |\n|---|---|---|")
    for name, t in times.items():
        ips = args.batch * args.steps / statistics.median(t)
        print(f"| {name} | {ips:.1f} | {ips / base:.2f}x |")


def chunk_worker(args, device: torch.device) -> None:
    """One setting in this (fresh) process: prints one JSON line."""
    step, prec = clipft_step(args, device, args.amp, args.worker_chunk)
    times = [seconds(step, args.steps, device) for _ in range(args.rounds)]
    rec = {"embed_chunk": args.worker_chunk, "precision": prec.name, "setup_mb": step.setup_mb,
           "peak_mb": peak_mb(device), "img_s": args.batch * args.steps / statistics.median(times)}
    print(json.dumps(rec))


def chunk_table(args) -> None:
    rows = []
    for chunk in args.chunks:
        cmd = [sys.executable, __file__, "--worker-chunk", str(chunk), "--backbone", args.backbone,
               "--size", str(args.size), "--batch", str(args.batch), "--steps", str(args.steps),
               "--rounds", str(args.rounds), "--amp", args.amp] + (["--compile"] if args.compile else [])
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    where = "peak GPU memory allocated" if torch.cuda.is_available() else "peak RSS of the process"
    print(f"| train.embed_chunk | precision | {where} (MB) | of which the steps (peak - setup) | img/s (median of "
          "rounds) |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['embed_chunk'] or 'off'} | {r['precision']} | {r['peak_mb']:.0f} | "
              f"{r['peak_mb'] - r['setup_mb']:.0f} | {r['img_s']:.1f} |")


def tower_worker(args, device: torch.device) -> None:
    """--tower-worker: one tower in this (fresh) process, one JSON line."""
    args.backbone = args.tower_worker
    step, prec = clipft_step(args, device, "auto")
    times = [seconds(step, args.steps, device) for _ in range(args.rounds)]
    train_peak = peak_mb(device)
    model = build_image_tower(ModelConfig(backbone=args.backbone, image_weights="none", head_hidden=1024),
                              512).to(device).eval()
    params = sum(p.numel() for p in model.parameters())
    x = batch_for(args, device)[0].to(device)
    with torch.inference_mode():
        model(x)  # warm-up
        emb = [seconds(lambda: model(x), args.steps, device) for _ in range(args.rounds)]
    print(json.dumps({"backbone": args.backbone, "params": params, "precision": prec.name,
                      "train_img_s": args.batch * args.steps / statistics.median(times), "peak_mb": train_peak,
                      "embed_img_s": args.batch * args.steps / statistics.median(emb)}))


def tower_table(args) -> None:
    where = "peak GPU memory allocated" if torch.cuda.is_available() else "peak RSS"
    print(f"| tower | parameters (tower, 512-d head) | precision | train step img/s | {where} (MB) | "
          "embedding img/s |\n|---|---|---|---|---|---|")
    for backbone in args.towers:
        cmd = [sys.executable, __file__, "--tower-worker", backbone, "--size", str(args.size), "--batch",
               str(args.batch), "--steps", str(args.steps), "--rounds", str(args.rounds)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        print(f"| {r['backbone']} | {r['params'] / 1e6:.1f} M | {r['precision']} | {r['train_img_s']:.1f} | "
              f"{r['peak_mb']:.0f} | {r['embed_img_s']:.1f} |", flush=True)


RECIPES = {  # name -> (train.text_negatives as a number, image queue, loss, ema)
    "baseline": (0, 0, "infonce", 0.0), "bank1024": (1024, 0, "infonce", 0.0), "bankall": (-1, 0, "infonce", 0.0),
    "queue1024": (0, 1024, "infonce", 0.0), "siglip": (0, 0, "siglip", 0.0), "ema": (0, 0, "infonce", 0.999),
}


def recipe_step(args, device: torch.device, name: str):
    """clipft's step (train.amp=auto) with one recipe option; returns (step, added bytes)."""
    import math
    from clipft.objectives import SIGLIP_INIT_BIAS, Recipe
    from clipft.train.ema import WeightEMA
    negatives, queue, kind, ema_decay = RECIPES[name]
    torch.manual_seed(0)
    prec = select_precision(device, "auto")
    model = build_image_tower(ModelConfig(backbone=args.backbone, image_weights="none", head_hidden=1024),
                              512).to(device)
    if prec.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if kind == "siglip":
        with torch.no_grad():
            model.logit_scale.fill_(math.log(10.0))
        model.add_logit_bias(SIGLIP_INIT_BIAS)
    opt = build_optimizer(model, 1e-4, 0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    scaler = torch.amp.GradScaler(device.type, enabled=prec.dtype == torch.float16)
    g = torch.Generator().manual_seed(1)
    bank = torch.nn.functional.normalize(torch.randn(args.bank_size, 512, generator=g), dim=-1)
    cap2img = torch.arange(args.bank_size) // 5
    recipe = None
    if name != "baseline" and name != "ema":
        recipe = Recipe(negatives=negatives, queue_size=queue, kind=kind, bank=bank if negatives else None,
                        cap2img=cap2img if negatives else None, device=device, dtype=prec.dtype or torch.float32,
                        tower=model, dim=512)
    ema = WeightEMA(model, ema_decay) if ema_decay else None
    images, texts = batch_for(args, device)
    ids = torch.arange(args.batch)
    added = 0
    if recipe is not None and recipe.bank is not None:
        added += recipe.bank.element_size() * recipe.bank.nelement() + 8 * recipe.bank_ids.nelement()
    if recipe is not None and recipe.queue is not None:
        added += 4 * recipe.queue.emb.nelement() + 8 * recipe.queue.ids.nelement()
    if ema is not None:
        added += sum(v.element_size() * v.nelement() for v in ema.module.state_dict().values())
    count = [0]

    def step() -> None:
        micro = [(images, texts, {"image_ids": ids, "epoch": 1, "step": count[0], "micro": 0})] if recipe else \
            [(images, texts)]
        train_step(model, micro, opt, sched, scaler, prec.dtype, 1.0, channels_last=prec.channels_last,
                   loss_fn=recipe or clip_loss)
        if ema is not None:
            ema.update(model)
        count[0] += 1
    step()  # warm-up
    return step, added, prec


def recipe_table(args, device: torch.device) -> None:
    from clipft.train import clustered
    steps, added = {}, {}
    for name in ([] if args.loss_only else args.recipes):
        steps[name], added[name], prec = recipe_step(args, device, name)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.rounds):  # interleaved: a shared machine's slow moments hit every option alike
        for name, step in steps.items():
            times[name].append(seconds(step, args.steps, device))
    base = statistics.median(times[args.recipes[0]]) if steps else 1.0
    if steps:
        print(f"precision {prec.name}; bank of {args.bank_size} captions x 512")
    if steps:
        print("| option | s/step (median of rounds) | vs " + args.recipes[0] + " | device memory added (MB) |\n|---|---|---|---|")
    for name, t in times.items():
        m = statistics.median(t)
        print(f"| {name} | {m / args.steps:.3f} | {m / base:.2f}x | {added[name] / 2**20:.1f} |")
    # The loss alone (forward + backward on [B, 512] embeddings): what each option adds to the step, with
    # no ResNet in the measurement (so a shared machine's noise in the tower's time does not hide it).
    from clipft.loss import clip_loss as plain_loss
    from clipft.objectives import Recipe
    g = torch.Generator().manual_seed(3)
    emb = torch.nn.functional.normalize(torch.randn(args.batch, 512, generator=g), dim=-1).to(device)
    txt = torch.nn.functional.normalize(torch.randn(args.batch, 512, generator=g), dim=-1).to(device)
    bank = torch.nn.functional.normalize(torch.randn(args.bank_size, 512, generator=g), dim=-1)
    ids = torch.arange(args.batch, device=device)
    scale = torch.tensor(14.0, device=device)
    print("| option | loss forward + backward (ms, median of 20) |\n|---|---|")
    for name in args.recipes:
        negatives, queue, kind, _ = RECIPES[name]
        r = None if negatives == 0 and queue == 0 and kind == "infonce" else Recipe(
            negatives=negatives, queue_size=queue, kind=kind, bank=bank if negatives else None,
            cap2img=(torch.arange(args.bank_size) // 5) if negatives else None, device=device, dim=512)
        ts = []
        for i in range(21):
            x = emb.clone().requires_grad_()
            sync(device)
            t0 = time.perf_counter()
            terms = r(x, txt, scale, image_ids=ids, step=i) if r else plain_loss(x, txt, scale)
            terms["loss"].backward()
            sync(device)
            ts.append(time.perf_counter() - t0)
        print(f"| {name} | {1000 * statistics.median(ts[1:]):.2f} |")
    g = torch.Generator().manual_seed(2)
    caps = torch.nn.functional.normalize(torch.randn(args.bank_size, 512, generator=g), dim=-1)
    t0 = time.perf_counter()
    clustered.load_or_build_clusters(caps, torch.arange(0, args.bank_size + 1, 5), args.batch, 0, None)
    print(f"data.batch_sampler=clustered: k-means of {args.bank_size // 5} images into "
          f"{max(1, args.bank_size // 5 // args.batch)} clusters once: {time.perf_counter() - t0:.2f} s (cached after)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="resnet50")
    p.add_argument("--batch", type=int, default=None, help="default: 256 on CUDA, 16 on CPU")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--steps", type=int, default=None, help="steps per round (default: 10 on CUDA, 2 on CPU)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="torch.compile clipft's model (train.compile)")
    p.add_argument("--chunks", type=lambda s: [int(v) for v in s.split(",")], default=None,
                   help="compare train.embed_chunk values, e.g. 0,64 (one process each)")
    p.add_argument("--amp", default="auto", help="train.amp for --chunks")
    p.add_argument("--no-thread-plan", action="store_true",
                   help="leave torch's thread count and OpenMP's wait policy at their defaults (as before clipft.threads)")
    p.add_argument("--worker-chunk", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--towers", type=lambda s: s.split(","), default=None,
                   help="compare towers, e.g. resnet50,timm:convnext_tiny (one process each)")
    p.add_argument("--tower-worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--recipes", type=lambda s: s.split(","), default=None,
                   help=f"compare recipe options side by side, the first is the reference: {','.join(RECIPES)}")
    p.add_argument("--bank-size", type=int, default=10000, help="captions in the bank for --recipes")
    p.add_argument("--loss-only", action="store_true", help="--recipes: time the loss alone (no tower steps)")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.batch = args.batch or (256 if device.type == "cuda" else 16)
    args.steps = args.steps or (10 if device.type == "cuda" else 2)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if args.worker_chunk is not None:
        return chunk_worker(args, device)
    if args.tower_worker is not None:
        return tower_worker(args, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"torch {torch.__version__} on {name} ({torch.get_num_threads()} threads); {args.backbone} + head, "
          f"{args.size} px, batch {args.batch}, {args.rounds} rounds x {args.steps} steps")
    if args.towers:
        tower_table(args)
    elif args.recipes:
        recipe_table(args, device)
    elif args.chunks:
        chunk_table(args)
    else:
        precision_table(args, device)


if __name__ == "__main__":
    main()
