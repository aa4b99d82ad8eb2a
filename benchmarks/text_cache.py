"""Caption caching: clipft's length-sorted, dynamically padded encoding vs the plain approach.

Baseline (what lab implementations do): tokenize with padding to 77, batches of 64 in dataset order,
attention mask passed, torch.no_grad. clipft (`TextEncoder.encode`): sort by token length, pad each
batch only to its longest caption (exact for CLIP's causal mask: the pooled EOT token never sees what
follows it), torch.inference_mode, same batch size (64). Same model, captions and process, CPU fp32.
Then clipft in fp32 (`train.amp=off`) against bf16 autocast (`train.amp=bf16`, what `auto` picks on
a CPU with native bf16), taking turns for --rounds rounds (median reported), with the cosine of each
bf16 embedding to its fp32 one.

The model is a randomly initialised CLIPTextModelWithProjection with the default config, i.e. the
shapes (and cost) of the ViT-B/32 text tower (63M parameters), plus OpenAI's real BPE tokenizer
built from open_clip's vocab file: no download needed.

    python benchmarks/text_cache.py [--captions 512] [--data COCO_ROOT] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from clipft.data import load_coco_captions
from clipft.data.shapes import make_shapes_dataset
from clipft.text import load_text_encoder, save_random_clip_text_model


@torch.no_grad()
def baseline_encode(enc, captions: list[str], batch_size: int = 64) -> torch.Tensor:
    out = []
    for s in range(0, len(captions), batch_size):
        tok = enc.tokenizer(captions[s:s + batch_size], padding="max_length", truncation=True,
                            max_length=77, return_tensors="pt")
        emb = enc.module(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]).text_embeds
        out.append(torch.nn.functional.normalize(emb, dim=-1))
    return torch.cat(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--captions", type=int, default=512)
    p.add_argument("--data", help="a COCO-layout root whose val captions to use (default: generated shapes)")
    p.add_argument("--rounds", type=int, default=3, help="fp32/bf16 rounds (median reported)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.data) if args.data else make_shapes_dataset(Path(tmp) / "shapes", n_train=1,
                                                                      n_val=args.captions // 5 + 1)
        captions = load_coco_captions(root, "val").captions[:args.captions]
        model_dir = save_random_clip_text_model(Path(tmp) / "clip-b32-text", hidden_size=512, num_layers=12,
                                                heads=8, projection_dim=512)
        enc = load_text_encoder(str(model_dir), device="cpu", amp="off")
        n_params = sum(p.numel() for p in enc.module.parameters())
        lengths = [len(t) for t in enc.tokenize(captions)]
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; text tower {n_params / 1e6:.1f}M params")
        print(f"{len(captions)} captions; tokens per caption (incl. BOS/EOS): mean {statistics.mean(lengths):.1f}, "
              f"median {statistics.median(lengths)}, min {min(lengths)}, max {max(lengths)}")
        enc.encode(captions[:64])  # warm-up (allocator, thread pool)
        baseline_encode(enc, captions[:64])

        t = time.perf_counter()
        ref = baseline_encode(enc, captions)
        t_base = time.perf_counter() - t
        t = time.perf_counter()
        ours = enc.encode(captions, batch_size=64)
        t_ours = time.perf_counter() - t
        precision = precision_rounds(enc, load_text_encoder(str(model_dir), device="cpu", amp="bf16"),
                                     captions, args.rounds)

    diff = float((ours - ref).abs().max())
    print(f"baseline (pad to 77, batch 64, unsorted): {t_base:.2f} s = {len(captions) / t_base:.1f} captions/s")
    print(f"clipft (sorted, dynamic padding, batch 64): {t_ours:.2f} s = {len(captions) / t_ours:.1f} captions/s")
    print(f"speed-up {t_base / t_ours:.1f}x; max |difference| {diff:.2e} (must be < 1e-4)")
    t32, t16, cos = precision
    print(f"clipft fp32: {len(captions) / t32:.1f} captions/s; bf16 autocast: {len(captions) / t16:.1f} captions/s "
          f"({t32 / t16:.2f}x; median of {args.rounds} rounds); cosine to fp32: min {cos.min():.5f}, "
          f"mean {cos.mean():.5f}")


def precision_rounds(enc32, enc16, captions: list[str], rounds: int) -> tuple[float, float, torch.Tensor]:
    """Median seconds of fp32 and bf16 encoding (taking turns), and each caption's fp32/bf16 cosine."""
    enc16.encode(captions[:64])  # warm-up: oneDNN builds its bf16 kernels
    times: dict[str, list[float]] = {"fp32": [], "bf16": []}
    out = {}
    for _ in range(rounds):
        for name, enc in (("fp32", enc32), ("bf16", enc16)):
            t = time.perf_counter()
            out[name] = enc.encode(captions, batch_size=64)
            times[name].append(time.perf_counter() - t)
    cos = torch.nn.functional.cosine_similarity(out["bf16"], out["fp32"], dim=-1)  # [M]
    return statistics.median(times["fp32"]), statistics.median(times["bf16"]), cos


if __name__ == "__main__":
    main()
