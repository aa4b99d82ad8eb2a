"""Search speed: query latency of an index, and indexing throughput against a one-image-at-a-time loop.

  latency     synthetic L2-normalised 512-d embeddings (100k and 1M rows: 1,000 Gaussian clusters
              plus noise, so neighbours exist as they do among real photos); queries are noisy
              copies of random rows. Exact: `query.top_k`, one [N, D] @ [D] product and a top-k, on
              float32 rows and on float16 rows (what `clipft index` stores by default). Approximate: `query.build_ann` (faiss IVF-Flat, sqrt(N) cells, nprobe 32), with
              its recall@10 against the exact top 10, for the row-copy queries and for text-like
              queries: a cluster centre plus a modality-gap vector shared by all of them plus noise,
              renormalised, so they lie outside the image cloud as CLIP's text embeddings do (the
              hard case for an IVF index). Median and 95th percentile over --queries queries, on
              --threads threads.
  throughput  images/s to index a folder of synthetic 640x480 JPEGs with a model loaded by
              `clipft.load`: `clipft index` (`index.update_index`: batched, decoding in worker
              processes, chunks committed to SQLite) against a plain loop that opens one image and
              calls `model.encode_images([image])` per file.

    python benchmarks/search.py latency [--sizes 100000 1000000] [--threads 2] [--queries 200]
    python benchmarks/search.py throughput --model MODEL [--images 512] [--threads 2] [--workers 2]
    python benchmarks/search.py quality --model MODEL --data SHAPES_ROOT [--split val]

  quality     precision@10 of the "a <colour> <shape>" text queries on a shapes dataset's split,
              relevant = the images whose labels hold that object (`search.quality`), beside chance.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from clipft.search.query import LoadedIndex, build_ann, top_k


def _centres(d: int, clusters: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 12345)
    return torch.nn.functional.normalize(torch.randn(clusters, d, generator=g), dim=1)  # [clusters, d]


def text_like_queries(n: int, d: int = 512, clusters: int = 1000, seed: int = 0) -> torch.Tensor:
    """[n, d] queries about the clusters of `synthetic_index(..., d, clusters, seed)` but outside the
    image cloud: centre + 2 x a gap vector shared by all queries + noise, renormalised (cosine to the
    nearest images ~0.3, as CLIP's text-image cosines)."""
    g = torch.Generator().manual_seed(seed + 1)
    gap = torch.nn.functional.normalize(torch.randn(d, generator=g), dim=0)
    noise = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)
    centres = _centres(d, clusters, seed)[torch.randint(clusters, (n,), generator=g)]
    return torch.nn.functional.normalize(centres + 2.0 * gap + 0.9 * noise, dim=1)


def synthetic_index(n: int, d: int = 512, clusters: int = 1000, seed: int = 0) -> LoadedIndex:
    """n clustered unit vectors [n, d], generated in blocks to bound peak memory."""
    g = torch.Generator().manual_seed(seed)
    centres = _centres(d, clusters, seed)
    emb = torch.empty(n, d)
    for s in range(0, n, 100_000):
        e = min(n, s + 100_000)
        x = centres[torch.randint(clusters, (e - s,), generator=g)] + 0.04 * torch.randn(e - s, d, generator=g)
        emb[s:e] = torch.nn.functional.normalize(x, dim=1)
    return LoadedIndex(index_dir=Path("."), root=Path("."), info={}, ids=np.arange(n), paths=[""] * n,
                       sha256=[""] * n, emb=emb)


def _times(idx: LoadedIndex, queries: torch.Tensor, k: int = 10) -> tuple[list[float], list[set[int]]]:
    ms, found = [], []
    top_k(idx, queries[0], k)  # warm-up
    for q in queries:
        t0 = time.perf_counter()
        hits = top_k(idx, q, k)
        ms.append((time.perf_counter() - t0) * 1000)
        found.append({h.id for h in hits})
    return ms, found


def _p(ms: list[float]) -> str:
    return f"median {statistics.median(ms):7.2f} ms   p95 {np.percentile(ms, 95):7.2f} ms   best {min(ms):6.2f} ms"


def latency(sizes: list[int], n_queries: int, threads: int) -> None:
    import faiss
    faiss.omp_set_num_threads(threads)
    for n in sizes:
        idx = synthetic_index(n)
        g = torch.Generator().manual_seed(1)
        rows = torch.randint(n, (n_queries,), generator=g)
        queries = torch.nn.functional.normalize(idx.emb[rows] + 0.03 * torch.randn(n_queries, 512, generator=g), dim=1)
        exact_ms, exact = _times(idx, queries)
        print(f"{n:>9,} x 512  exact, float32 rows         {_p(exact_ms)}")
        f32 = idx.emb
        idx.emb = f32.half()  # what the index stores by default
        half_ms, half = _times(idx, queries)
        agree = np.mean([len(a & e) / 10 for a, e in zip(half, exact)])
        err = max(abs(h.score - float(f32[h.id] @ q)) for q in queries[:50] for h in top_k(idx, q, 10))
        print(f"{n:>9,} x 512  exact, float16 rows (default) {_p(half_ms)}   top-10 equal to float32's: {agree:.3f}"
              f"   max score error {err:.1e}")
        idx.emb = f32
        texts = text_like_queries(n_queries)
        _, exact_text = _times(idx, texts)
        t0 = time.perf_counter()
        idx.ann = build_ann(idx.emb)
        build_s = time.perf_counter() - t0
        ann_ms, approx = _times(idx, queries)
        recall = np.mean([len(a & e) / 10 for a, e in zip(approx, exact)])
        _, approx_text = _times(idx, texts)
        text_recall = np.mean([len(a & e) / 10 for a, e in zip(approx_text, exact_text)])
        print(f"{n:>9,} x 512  faiss IVF-Flat (nlist {idx.ann.nlist}, nprobe {idx.ann.nprobe})  {_p(ann_ms)}   "
              f"recall@10 vs exact: row copies {recall:.3f}, text-like {text_recall:.3f}   built in {build_s:.1f} s")
        del idx


def write_jpegs(out: Path, n: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for i in range(n):
        low = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
        img = np.asarray(Image.fromarray(low).resize((640, 480), Image.BICUBIC), dtype=np.int16)
        img = np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(out / f"{i:06d}.jpg", quality=90)


def throughput(model_source: str, n: int, workers: int, batch_size: int) -> None:
    from clipft.inference import load
    from clipft.search.index import update_index
    model = load(model_source)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "photos"
        folder.mkdir()
        write_jpegs(folder, n)
        paths = sorted(folder.glob("*.jpg"))
        model.encode_images([paths[0]])  # warm-up
        t0 = time.perf_counter()
        with torch.inference_mode():
            for p in paths:
                with Image.open(p) as im:
                    model.encode_images([im.convert("RGB")])
        loop_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        stats = update_index(folder, model, Path(tmp) / "index", batch_size=batch_size, workers=workers,
                             progress=False)
        index_s = time.perf_counter() - t0
        assert stats.embedded == n
        t0 = time.perf_counter()
        update_index(folder, model, Path(tmp) / "index", progress=False)
        rerun_s = time.perf_counter() - t0
    print(f"model {model.name} ({model.image_size} px, {model.embed_dim}-d), {n} JPEGs 640x480")
    print(f"  one image at a time   {n / loop_s:7.1f} images/s")
    print(f"  clipft index          {n / index_s:7.1f} images/s   ({loop_s / index_s:.1f}x; batch {batch_size}, "
          f"{workers} decoding workers)")
    print(f"  rerun, nothing new    {rerun_s:7.2f} s")


def quality(model_source: str, data: str, split: str) -> None:
    from clipft.inference import load
    from clipft.search.index import update_index
    from clipft.search.query import load_index
    from clipft.search.quality import precision_at_k, shapes_queries
    model = load(model_source)
    with tempfile.TemporaryDirectory() as tmp:
        update_index(Path(data) / f"{split}2014", model, Path(tmp) / "index", progress=False)
        idx = load_index(Path(tmp) / "index")
        p = precision_at_k(idx, model, shapes_queries(data, split))
    print(f"model {model.name}, {len(idx)} {split} images: precision@10 of {p['queries']} colour+shape queries "
          f"{100 * p['precision']:.1f}% (chance {100 * p['chance']:.1f}%)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="what", required=True)
    a = sub.add_parser("latency")
    a.add_argument("--sizes", nargs="+", type=int, default=[100_000, 1_000_000])
    a.add_argument("--queries", type=int, default=200)
    a.add_argument("--threads", type=int, default=2)
    b = sub.add_parser("throughput")
    b.add_argument("--model", required=True, help="exported dir, clipft checkpoint, or HF CLIP name/dir")
    b.add_argument("--images", type=int, default=512)
    b.add_argument("--workers", type=int, default=2)
    b.add_argument("--batch-size", type=int, default=64)
    b.add_argument("--threads", type=int, default=2)
    c = sub.add_parser("quality")
    c.add_argument("--model", required=True)
    c.add_argument("--data", required=True, help="a folder written by `clipft make-data shapes`")
    c.add_argument("--split", default="val")
    c.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]  # other processes on the machine inflate medians; "best" is the least disturbed query
    print(f"torch {torch.__version__}, {args.threads} threads, {os.cpu_count()} CPUs, load average {load:.1f}")
    if args.what == "latency":
        latency(args.sizes, args.queries, args.threads)
    elif args.what == "quality":
        quality(args.model, args.data, args.split)
    else:
        throughput(args.model, args.images, args.workers, args.batch_size)


if __name__ == "__main__":
    main()
