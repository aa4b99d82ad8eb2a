"""Retrieval metrics: pure functions over embeddings (no model, no data loading, no loop).

COCO has ~5 captions per image, so every metric takes an explicit caption->image index
(`text_to_image`, LongTensor [M]) instead of assuming a 1:1 diagonal.
"""

from __future__ import annotations

import time
from typing import Iterable, Sequence

import torch

DIRECTIONS = ("image_to_text", "text_to_image")


class EvaluationError(ValueError):
    """Embeddings that cannot be scored (non-finite values, wrong shapes): refused, never ranked."""


def check_finite(image_emb: torch.Tensor, text_emb: torch.Tensor, where: str = "embeddings") -> None:
    """Raise EvaluationError naming `where` and how many image/text rows hold NaN or inf.

    Every comparison with NaN is false, so a NaN query would otherwise outrank every negative and
    score a perfect recall: a broken model must never look good."""
    def bad_rows(x: torch.Tensor) -> int:
        # A sum is finite only if every value is (NaN and inf propagate): one cheap pass. A sum that
        # overflowed to inf looks the same, so rows are then counted exactly.
        if not x.numel() or bool(torch.isfinite(x.sum())):
            return 0
        return int((~torch.isfinite(x)).any(dim=-1).sum())
    bad_img, bad_txt = bad_rows(image_emb), bad_rows(text_emb)
    if bad_img or bad_txt:
        raise EvaluationError(f"{where}: {bad_img} of {image_emb.shape[0]} image embeddings and {bad_txt} of "
                              f"{text_emb.shape[0]} text embeddings are not finite (NaN/inf): the model diverged "
                              "or its input is broken; refusing to score them")


# The ranks are defined on float64 scores: fp32 inputs give float64 dot products exact to ~1e-16, so
# two scores that are equal in exact arithmetic (identical embeddings) are equal within TIE_ATOL,
# whichever kernel computed them, while two scores that differ in fp32 differ by far more.
TIE_ATOL = 1e-9
# The bulk of the [N, M] score matrix is computed in float32 (twice the speed of float64 on CPU and
# GPU), and only the entries whose float32 score is too close to a threshold to decide are
# recomputed in float64, so the ranks are exactly the float64 ones (tested). An fp32 dot product
# of D terms is within D * 2**-24 * |x| |y| of the exact one, whatever the summation order
# (Higham, "Accuracy and Stability of Numerical Algorithms", 3.1): FP32_SLACK * D * |x| |y| keeps a
# margin above that bound and above the rounding of the float64 thresholds to float32.
FP32_SLACK = 1.25 * 2.0 ** -24
RETIME_TILES = 32  # tiles between two timings of a counting pass on one thread vs all (retrieval_ranks)


def _tile_counts(s: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, dim: int, buf: torch.Tensor,
                 ones: torch.Tensor):
    """(#entries >= lo, #entries > hi) along `dim`: s [r, c] float32, thresholds broadcastable.

    The comparisons write 0/1 as float32 and a matrix-vector product with ones counts them: about 5x
    faster on CPU than summing a bool tensor, and exact (counts stay far below 2**24)."""
    def count(mask: torch.Tensor) -> torch.Tensor:
        return (torch.mv(mask, ones[:mask.shape[1]]) if dim == 1 else torch.mv(mask.T, ones[:mask.shape[0]])).long()
    return count(torch.ge(s, lo, out=buf)), count(torch.gt(s, hi, out=buf))


def _count_tile(s: torch.Tensor, c_buf: torch.Tensor, r0: int, c0: int, text_to_image: torch.Tensor,
                thresholds: tuple, image_emb: torch.Tensor, text_emb: torch.Tensor, ones: torch.Tensor,
                image_rank: torch.Tensor, text_rank: torch.Tensor) -> None:
    """Add one tile's negatives to the ranks. s [r, c] float32 = scores of images r0.. with captions
    c0..; positives are masked here (s is overwritten). Entries inside the undecided band of their
    threshold are re-scored in float64 (`_exact_count`)."""
    best_lo, best_in, best_out, pos_lo, pos_in, pos_out = thresholds
    r1, c1 = r0 + s.shape[0], c0 + s.shape[1]
    t2i = text_to_image[c0:c1]
    own = (t2i >= r0) & (t2i < r1)  # this tile's positives: never negatives
    own_cols = torch.nonzero(own).squeeze(1)
    s[t2i[own_cols] - r0, own_cols] = float("-inf")
    buf = c_buf[:s.numel()].view_as(s)
    i_maybe, i_sure = _tile_counts(s, best_in[r0:r1, None], best_out[r0:r1, None], 1, buf, ones)
    t_maybe, t_sure = _tile_counts(s, pos_in[None, c0:c1], pos_out[None, c0:c1], 0, buf, ones)
    image_rank[r0:r1] += i_sure
    text_rank[c0:c1] += t_sure
    if bool((i_maybe != i_sure).any()):
        rr = torch.nonzero(i_maybe != i_sure).squeeze(1)
        sub = s[rr]
        r_idx, c_idx = torch.nonzero((sub >= best_in[r0 + rr, None]) & (sub <= best_out[r0 + rr, None]),
                                     as_tuple=True)
        rows, cols = r0 + rr[r_idx], c0 + c_idx
        image_rank.index_add_(0, rows, _exact_count(image_emb, text_emb, rows, cols, best_lo[rows]))
    if bool((t_maybe != t_sure).any()):
        cc = torch.nonzero(t_maybe != t_sure).squeeze(1)
        sub = s[:, cc]
        r_idx, c_idx = torch.nonzero((sub >= pos_in[None, c0 + cc]) & (sub <= pos_out[None, c0 + cc]),
                                     as_tuple=True)
        rows, cols = r0 + r_idx, c0 + cc[c_idx]
        text_rank.index_add_(0, cols, _exact_count(image_emb, text_emb, rows, cols, pos_lo[cols]))


POS_CHUNK = 8192  # captions whose positive score is computed at a time ([8192, D] float64 pairs)


def _row_dots(image_emb: torch.Tensor, text_emb: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Float64 dot products of image rows[p] with caption cols[p]: [P], the inputs widened exactly."""
    return (image_emb[rows].double() * text_emb[cols].double()).sum(-1)


def _max_norm(x: torch.Tensor) -> float:
    """An upper bound of the largest L2 norm of the rows of x [n, D] (0 for no rows): the float32 norm
    (relative error below D * 2**-24, 3e-5 at D = 512) raised by 0.1%."""
    return 1.001 * float(torch.linalg.vector_norm(x.float(), dim=1).max()) if len(x) else 0.0


def _one_thread_is_faster(s: torch.Tensor, c_buf: torch.Tensor, thresholds: torch.Tensor, threads: int) -> bool:
    """Whether the counting should run on one thread: True unless one compare pass over the tile
    s [r, c] runs at least twice as fast on `threads` (median of 5 timings each; a few ms). The
    margin: a wrong pick of one thread costs a few percent of the tile's product, a wrong pick of
    all threads on a busy machine costs more than the product (measured: 24 instead of 8.6 ms a
    tile, 16,000 x 80,000 on 2 busy cores, when 3 of 20 probes had picked all threads)."""
    buf = c_buf[:s.numel()].view_as(s)

    def median_time(k: int) -> float:
        torch.set_num_threads(k)
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            torch.ge(s, thresholds, out=buf)
            times.append(time.perf_counter() - t0)
        return sorted(times)[2]
    try:
        return 2 * median_time(threads) > median_time(1)
    finally:
        torch.set_num_threads(threads)


def _exact_count(image_emb, text_emb, rows, cols, thresholds) -> torch.Tensor:
    """Float64 re-check of ambiguous (image row, caption col) pairs: 1 where score >= threshold."""
    return (_row_dots(image_emb, text_emb, rows, cols) >= thresholds).long()  # same dot products as the reference


@torch.inference_mode()
def retrieval_ranks(image_emb: torch.Tensor, text_emb: torch.Tensor, text_to_image: torch.Tensor,
                    chunk_size: int | None = None, col_chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank (0 = top) of the best positive for every image query and every caption query.

    image_emb [N, D], text_emb [M, D], text_to_image [M] (image row of each caption).
    Returns (image_rank [N], text_rank [M]) as LongTensors. Non-finite embeddings are refused
    (`EvaluationError`).

    Instead of sorting, each query's rank is the number of *negatives* that score at least as high
    as its best positive, counted over tiles of the score matrix S = image_emb @ text_emb.T (the full
    [N, M] matrix is never held). Ties count AGAINST the query: a negative scoring equal to the
    positive ranks ahead of it, so a collapsed tower (every image the same embedding) scores 0
    text->image and about chance image->text, never better.
      image i:   #{captions j of other images : S[i, j] >= max_{j' of i} S[i, j'] - TIE_ATOL}
      caption j: #{images i != img(j)         : S[i, j] >= S[img(j), j] - TIE_ATOL}
    with S in float64. Positives are masked out of the comparison (they are not negatives, even when
    tied). Tiles are scored in float32; an entry within the float32 error bound of its threshold is
    re-scored in float64, so the result equals an all-float64 evaluation exactly.

    Cost: the float32 tile products plus a few passes over each cached tile. On a CPU with several
    threads the passes run on one thread or on all, whichever a timing every RETIME_TILES tiles
    finds faster (on cores busy with other work, every parallel pass waits for a parked thread).
    `python benchmarks/retrieval.py` reports the time as a multiple of the bare products.
    """
    if image_emb.ndim != 2 or text_emb.ndim != 2 or image_emb.shape[1] != text_emb.shape[1]:
        raise EvaluationError(f"expected [N, D] and [M, D] embeddings, got {tuple(image_emb.shape)} "
                              f"and {tuple(text_emb.shape)}")
    text_to_image = torch.as_tensor(text_to_image, dtype=torch.long, device=image_emb.device)
    n, m = image_emb.shape[0], text_emb.shape[0]
    if text_to_image.shape != (m,):
        raise EvaluationError(f"text_to_image must have shape [{m}], got {tuple(text_to_image.shape)}")
    if m and (int(text_to_image.min()) < 0 or int(text_to_image.max()) >= n):
        raise EvaluationError("text_to_image holds an index outside [0, num_images)")
    check_finite(image_emb, text_emb)
    dev = image_emb.device
    text_emb = text_emb.to(dev)
    # float32 operands of the tiles (the inputs themselves when they are float32: no copy); the
    # float64 rows the exact re-checks need are widened from the inputs on demand (`_exact_count`),
    # never held whole ([M, D] float64 is 830 MB for val2014's captions).
    img32 = image_emb.float().contiguous()
    txt32 = text_emb.float().contiguous()

    # Positive score of every caption with its own image: [M] float64, POS_CHUNK captions at a time.
    pos = torch.zeros(m, dtype=torch.float64, device=dev)
    for c0 in range(0, m, POS_CHUNK):
        cols = torch.arange(c0, min(m, c0 + POS_CHUNK), device=dev)
        pos[c0:c0 + len(cols)] = _row_dots(image_emb, text_emb, text_to_image[cols], cols)
    # Best positive per image: [N]; an image without captions keeps -inf (it is no image query;
    # retrieval_recall leaves it out).
    best_pos = torch.full((n,), float("-inf"), dtype=pos.dtype, device=dev)
    best_pos.scatter_reduce_(0, text_to_image, pos, reduce="amax")
    pos_lo, best_lo = pos - TIE_ATOL, best_pos - TIE_ATOL  # a score >= these counts as a tie or better

    # Half-width of the undecided band around each threshold, per row / per column (float64).
    d = image_emb.shape[1]
    band = FP32_SLACK * (d + 8) * _max_norm(image_emb) * _max_norm(text_emb)
    band = max(band, 1e-30)
    best_in, best_out = (best_lo - band).float(), (best_lo + band).float()  # [N]
    pos_in, pos_out = (pos_lo - band).float(), (pos_lo + band).float()  # [M]

    thresholds = (best_lo, best_in, best_out, pos_lo, pos_in, pos_out)
    if chunk_size is None:
        chunk_size = 512  # a [512, 4096] float32 tile is 8 MiB: its four counting passes stay in cache
    ones = torch.ones(max(chunk_size, col_chunk), dtype=torch.float32, device=dev)
    image_rank = torch.zeros(n, dtype=torch.long, device=dev)
    text_rank = torch.zeros(m, dtype=torch.long, device=dev)
    # Two tile buffers, allocated once: a fresh [r, c] tensor per tile would be page-faulted in anew.
    tile_elems = min(chunk_size, n) * min(col_chunk, m)
    s_buf = torch.empty(tile_elems, dtype=torch.float32, device=dev)
    c_buf = torch.empty(tile_elems, dtype=torch.float32, device=dev)
    prec = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # the error bound above assumes IEEE fp32 products
    try:
        threads = torch.get_num_threads()
        adaptive = threads > 1 and dev.type == "cpu"
        serial, tiles = False, 0
        for r0 in range(0, n, chunk_size):
            r1 = min(n, r0 + chunk_size)
            for c0 in range(0, m, col_chunk):
                c1 = min(m, c0 + col_chunk)
                s = s_buf[:(r1 - r0) * (c1 - c0)].view(r1 - r0, c1 - c0)
                torch.mm(img32[r0:r1], txt32[c0:c1].T, out=s)  # [r, c] float32, every thread
                # Counting = a dozen memory-bound passes over the cached tile. On busy cores every
                # parallel pass waits for a parked thread (12 ms instead of 0.2 ms for one compare of a
                # 512 x 4096 tile), so every RETIME_TILES tiles one pass is timed with all threads and
                # with one; the counting runs on the faster, the product always on every thread.
                if adaptive and tiles % RETIME_TILES == 0:  # the machine's load changes: decide again
                    serial = _one_thread_is_faster(s, c_buf, best_in[r0:r1, None], threads)
                tiles += 1
                if serial:
                    torch.set_num_threads(1)
                try:
                    _count_tile(s, c_buf, r0, c0, text_to_image, thresholds, image_emb, text_emb, ones,
                                image_rank, text_rank)
                finally:
                    if serial:
                        torch.set_num_threads(threads)
    finally:
        torch.set_float32_matmul_precision(prec)
    return image_rank, text_rank


def recall_from_ranks(ranks: torch.Tensor, ks: Iterable[int]) -> dict[str, float]:
    """{"R@k": percent of queries whose best positive ranks < k}."""
    total = max(1, ranks.numel())
    return {f"R@{k}": 100.0 * float((ranks < k).sum()) / total for k in ks}


def retrieval_recall(image_emb: torch.Tensor, text_emb: torch.Tensor, text_to_image: torch.Tensor,
                     ks: Sequence[int] = (1, 5, 10), chunk_size: int | None = None) -> dict[str, dict[str, float]]:
    """COCO-protocol Recall@K in percent, both directions.

    image->text: an image is a hit at K if ANY of its captions is in the top K captions.
    text->image: a caption is a hit at K if its image is in the top K images.
    Images that own no caption are not image queries.
    """
    text_to_image = torch.as_tensor(text_to_image, dtype=torch.long)
    image_rank, text_rank = retrieval_ranks(image_emb, text_emb, text_to_image, chunk_size)
    has_caption = torch.zeros(image_emb.shape[0], dtype=torch.bool, device=image_rank.device)
    has_caption[text_to_image.to(image_rank.device)] = True
    return {
        "image_to_text": recall_from_ranks(image_rank[has_caption], ks),
        "text_to_image": recall_from_ranks(text_rank, ks),
    }


def mean_recall(metrics: dict[str, dict[str, float]], k: int | None = None) -> float:
    """Mean of R@k over both directions (k=None: over every K, the usual 'rsum / 6')."""
    vals = [v for d in DIRECTIONS for name, v in metrics[d].items() if k is None or name == f"R@{k}"]
    return sum(vals) / max(1, len(vals))


def format_recall_table(metrics: dict[str, dict[str, float]]) -> str:
    """A small fixed-width table: one row per direction, one column per K."""
    ks = list(metrics["image_to_text"].keys())
    lines = [f"{'direction':<15}" + "".join(f"{k:>8}" for k in ks)]
    for d in DIRECTIONS:
        lines.append(f"{d:<15}" + "".join(f"{metrics[d][k]:8.2f}" for k in ks))
    return "\n".join(lines)


def format_fold_spread(metrics: dict) -> str:
    """The per-fold spread of a protocol with folds: std (min-max) per direction and K."""
    f = metrics["folds"]
    lines = [f"mean over {f['count']} folds; per-fold spread, std (min-max):"]
    for d in DIRECTIONS:
        lines.append(f"{d:<15}" + "  ".join(f"{k} {f['std'][d][k]:.2f} ({f['min'][d][k]:.2f}-{f['max'][d][k]:.2f})"
                                            for k in f["std"][d]))
    return "\n".join(lines)
