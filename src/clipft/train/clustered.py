"""Harder batches (data.batch_sampler=clustered): global batches drawn from k-means clusters of the
cached caption embeddings, so the in-batch negatives are semantically close.

Each training image is a point in text space: the normalised mean of its captions' cached
embeddings [N, D]. k = max(1, N // global batch) clusters by k-means++ seeding and a few Lloyd iterations in torch, all
seeded (spherical k-means: cosine assignment, normalised means), computed once and cached beside the
train caption cache (`<text cache>.clusters-k<k>-s<seed>.pt`, keyed by a fingerprint of the points).

The epoch order (`clustered_order`) is a function of (seed, epoch) alone: images shuffled within
each cluster, clusters in a shuffled order, laid end to end and cut into global batches of G =
batch_size x processes, whose order is shuffled again (so a batch holds one or two neighbouring
clusters, and the clusters come in a new order every epoch). Like `distributed.shard_train_indices`,
rank r takes the r-th contiguous slice of every global batch (no image on two ranks, none twice in an
epoch), and a resumed run skips the batches it trained on in the same list: exact.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch
import torch.nn.functional as F

log = logging.getLogger("clipft.train.loop")

LLOYD_ITERATIONS = 10


def image_points(caption_emb: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Each image's point in text space: the normalised mean of its captions' embeddings.
    caption_emb [M, D], offsets [N+1] (image i owns captions offsets[i]:offsets[i+1]) -> [N, D] fp32."""
    counts = (offsets[1:] - offsets[:-1]).clamp(min=1)
    owner = torch.repeat_interleave(torch.arange(len(counts)), offsets[1:] - offsets[:-1])  # [M]
    sums = torch.zeros(len(counts), caption_emb.shape[1]).index_add_(0, owner, caption_emb.float().cpu())
    return F.normalize(sums / counts[:, None], dim=-1)


def kmeans(points: torch.Tensor, k: int, seed: int, iterations: int = LLOYD_ITERATIONS) -> torch.Tensor:
    """Spherical k-means on the CPU, seeded: points [N, D] (unit rows) -> cluster of each point [N]."""
    n = points.shape[0]
    k = max(1, min(k, n))
    g = torch.Generator().manual_seed(seed)
    # k-means++ seeding (seeded): each next centre drawn with probability ~ squared distance to the nearest.
    chosen = [int(torch.randint(n, (1,), generator=g))]
    dist2 = (2 - 2 * points @ points[chosen[0]]).clamp(min=0)  # [N] squared distance on the sphere
    for _ in range(k - 1):
        c = int(torch.multinomial(dist2 + 1e-12, 1, generator=g)) if float(dist2.sum()) > 0 else \
            int(torch.randint(n, (1,), generator=g))
        chosen.append(c)
        dist2 = torch.minimum(dist2, (2 - 2 * points @ points[c]).clamp(min=0))
    centres = points[chosen].clone()  # [k, D]
    assign = torch.zeros(n, dtype=torch.long)
    for _ in range(iterations):
        assign = (points @ centres.T).argmax(1)  # [N]
        sums = torch.zeros_like(centres).index_add_(0, assign, points)
        empty = torch.bincount(assign, minlength=k) == 0
        centres = torch.where(empty[:, None], centres, F.normalize(sums, dim=-1))  # an empty cluster keeps its centre
    return (points @ centres.T).argmax(1)


def cluster_file(text_cache: Path, k: int, seed: int) -> Path:
    return Path(str(text_cache) + f".clusters-k{k}-s{seed}.pt")


def load_or_build_clusters(caption_emb: torch.Tensor, offsets: torch.Tensor, global_batch: int, seed: int,
                           text_cache: Path | None) -> torch.Tensor:
    """The cluster of every training image [N] (long), read from its cache file when the points match."""
    points = image_points(caption_emb, offsets)
    k = max(1, points.shape[0] // global_batch)
    fingerprint = hashlib.sha256(points.numpy().tobytes()).hexdigest()[:16]
    path = cluster_file(text_cache, k, seed) if text_cache is not None else None
    if path is not None and path.is_file():
        try:
            saved = torch.load(path, weights_only=True)
            if saved.get("fingerprint") == fingerprint:
                return saved["assign"]
        except Exception:  # noqa: BLE001 - a damaged cache is rebuilt
            pass
    assign = kmeans(points, k, seed)
    sizes = torch.bincount(assign, minlength=k)
    log.info("data.batch_sampler=clustered: %d images in %d caption clusters (sizes %d..%d, %d Lloyd iterations)",
             len(assign), k, int(sizes.min()), int(sizes.max()), LLOYD_ITERATIONS)
    if path is not None:
        try:
            tmp = path.with_name(path.name + ".tmp")
            torch.save({"assign": assign, "fingerprint": fingerprint, "k": k, "seed": seed}, tmp)
            tmp.replace(path)
        except OSError as e:  # a read-only cache directory: recomputed next time
            log.warning("%s: cannot cache the clusters (%s)", path, e.__class__.__name__)
    return assign


def clustered_order(assign: torch.Tensor, global_batch: int, seed: int, epoch: int) -> torch.Tensor:
    """The epoch's image order [steps x G] (whole global batches; the remainder dropped), a function
    of (seed, epoch): see the module docstring."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch + 7_919)
    n, k = len(assign), int(assign.max()) + 1 if len(assign) else 0
    perm = torch.randperm(n, generator=g)
    by_cluster = [perm[assign[perm] == c] for c in torch.randperm(k, generator=g).tolist()]
    flat = torch.cat(by_cluster) if by_cluster else perm
    if n <= global_batch:
        return flat
    steps = n // global_batch
    batches = flat[: steps * global_batch].view(steps, global_batch)
    return batches[torch.randperm(steps, generator=g)].reshape(-1)


def shard_clustered_indices(assign: torch.Tensor, batch_size: int, seed: int, epoch: int, rank: int = 0,
                            world_size: int = 1) -> list[int]:
    """This rank's indices of the epoch (consecutive runs of batch_size), as `shard_train_indices`."""
    g = batch_size * world_size
    order = clustered_order(assign, g, seed, epoch)
    n = len(order)
    if n <= g:
        return order[rank * n // world_size:(rank + 1) * n // world_size].tolist()
    return order.view(-1, world_size, batch_size)[:, rank].reshape(-1).tolist()
