"""Qualitative pictures of a checkpoint on a split: the data side of `clipft visualize`.

Each function turns a split's embeddings (`evaluate.SplitEmbeddings`: computed once, or loaded)
into the rows a plotting function of `clipft.eval.plots` draws. Samples are drawn with a seeded
generator, so the same command gives the same picture.

Default file names inside a run directory (what `clipft report` embeds):
  retrieval_text_to_image.png, retrieval_image_to_text.png, similarity_heatmap.png,
  data_samples.png, and zero-shot's zeroshot_<split>_examples.png / _confusion.png.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from ..data import CaptionedImages
from .evaluate import SplitEmbeddings, retrieval_ranks
from .protocols import VAL_PROTOCOLS

TEXT_TO_IMAGE_PNG = "retrieval_text_to_image.png"
IMAGE_TO_TEXT_PNG = "retrieval_image_to_text.png"
HEATMAP_PNG = "similarity_heatmap.png"
DATA_SAMPLES_PNG = "data_samples.png"
CURVES_PNG = "loss_curves.png"


def _sample(n_total: int, n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(n_total, generator=g)[:n].tolist())


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def _random_captions(c2r: torch.Tensor, n_rows: int, n: int, seed: int) -> list[int]:
    """One seeded random caption (index into the kept captions) of each of n seeded random images."""
    g = torch.Generator().manual_seed(seed + 1)
    picks = []
    for r in _sample(n_rows, n, seed):
        own = torch.nonzero(c2r == r).flatten()
        picks.append(int(own[torch.randint(own.numel(), (1,), generator=g)]))
    return picks


def text_to_image_results(emb: SplitEmbeddings, queries: Sequence[str] | None = None, query_emb: torch.Tensor | None = None,
                          n: int = 4, seed: int = 0, k: int = 5, picks: Sequence[int] | None = None) -> list[dict]:
    """Rows for `visualize.plot_text_to_image`.

    Without queries: n random dataset captions (one per random image) embedded from the cache, or
    the kept captions `picks` (indices as in `example_queries`). With queries (and their embeddings
    query_emb [Q, D] from the frozen text encoder): a query that is one of the split's captions
    (case and spacing ignored) has its correct image marked.
    """
    keep, c2r = emb.kept_captions()
    captions = [c for c, kp in zip(emb.data.captions, keep.tolist()) if kp]
    text = emb.text_emb[keep]  # [M_kept, D]
    if queries is None:
        picks = list(picks) if picks is not None else _random_captions(c2r, emb.rows.numel(), n, seed)
        queries = [captions[j] for j in picks]
        q = text[picks]
        correct = [int(c2r[j]) for j in picks]
    else:
        if query_emb is None or query_emb.shape[0] != len(queries):
            raise ValueError("query_emb [Q, D] is required with queries")
        q = query_emb
        owner = {_norm(c): int(r) for c, r in zip(captions, c2r.tolist())}
        correct = [owner.get(_norm(t)) for t in queries]
    scores = q @ emb.image_emb.T  # [Q, N_ok]
    out = []
    for i, query in enumerate(queries):
        order = scores[i].argsort(descending=True)
        top = [(emb.data.images[int(emb.rows[j])].path, float(scores[i, j]), correct[i] == int(j))
               for j in order[:k].tolist()]
        rank = None if correct[i] is None else int((order == correct[i]).nonzero()[0, 0])
        out.append({"query": query, "top": top, "correct_rank": rank})
    return out


def image_to_text_results(emb: SplitEmbeddings, n: int = 4, seed: int = 0, k: int = 5,
                          rows: Sequence[int] | None = None) -> list[dict]:
    """Rows for `visualize.plot_image_to_text`: n random images (or the embedding rows `rows`),
    their top-k captions of the split."""
    keep, c2r = emb.kept_captions()
    captions = [c for c, kp in zip(emb.data.captions, keep.tolist()) if kp]
    text = emb.text_emb[keep]
    out = []
    for r in (list(rows) if rows is not None else _sample(emb.rows.numel(), n, seed)):
        s = text @ emb.image_emb[r]  # [M_kept]
        order = s.argsort(descending=True)
        own = c2r[order] == r
        top = [(captions[j], float(s[j]), bool(own[p])) for p, j in enumerate(order[:k].tolist())]
        out.append({"path": emb.data.images[int(emb.rows[r])].path, "top": top,
                    "gt_rank": int(own.nonzero()[0, 0])})
    return out


def _best_and_worst(rank: torch.Tensor, score: torch.Tensor, allowed: torch.Tensor,
                    chosen: Sequence[int]) -> list[tuple[int, str]]:
    """[(best, "best by rank"), (worst, "worst by rank")] among the allowed queries not in chosen:
    ordered by the rank of the ground truth, ties broken by its cosine (higher is better)."""
    key = rank.double() * 4.0 - score.double()  # score in [-1, 1] only breaks ties between equal ranks
    order = [i for i in key.argsort().tolist() if bool(allowed[i]) and i not in set(chosen)]
    return [(order[0], "best by rank"), (order[-1], "worst by rank")] if len(order) >= 2 else []


def example_queries(emb: SplitEmbeddings, n: int = 3, seed: int = 0) -> dict[str, list[tuple[int, str]]]:
    """The report's rule for qualitative examples, so that none is hand-picked:
    {"captions": [(kept caption index, tag)], "images": [(embedding row, tag)]}: n seeded random
    queries (drawn as `clipft visualize` draws them), then the best and the worst remaining query by
    the rank of its ground truth (ties: the higher / lower cosine with it)."""
    keep, c2r = emb.kept_captions()
    text = emb.text_emb[keep]  # [M_kept, D]
    image_rank, text_rank = retrieval_ranks(emb.image_emb, text, c2r)  # [N_ok], [M_kept]
    pos = (emb.image_emb[c2r] * text).sum(-1)  # [M_kept]: each caption's cosine with its own image
    best_pos = torch.full((emb.rows.numel(),), float("-inf")).scatter_reduce(0, c2r, pos, reduce="amax")  # [N_ok]
    has_caption = torch.isfinite(best_pos)  # images without a caption are no image query
    tag = f"random (seed {seed})"
    cap = _random_captions(c2r, emb.rows.numel(), n, seed)
    img = _sample(emb.rows.numel(), n, seed)
    return {"captions": [(j, tag) for j in cap] + _best_and_worst(text_rank, pos, torch.ones_like(text_rank, dtype=torch.bool), cap),
            "images": [(r, tag) for r in img] + _best_and_worst(image_rank, best_pos.clamp(min=-1.0), has_caption, img)}


def heatmap_data(emb: SplitEmbeddings, n: int = 10, seed: int = 0) -> tuple[torch.Tensor, list[str], list[int]]:
    """(sim [n, M_n], image labels [n], caption owner [M_n]) for n random images and their captions."""
    keep, c2r = emb.kept_captions()
    text = emb.text_emb[keep]
    rows = _sample(emb.rows.numel(), n, seed)
    cols, owner = [], []
    for i, r in enumerate(rows):
        own = torch.nonzero(c2r == r).flatten().tolist()
        cols += own
        owner += [i] * len(own)
    sim = emb.image_emb[rows] @ text[cols].T  # [n, M_n]
    labels = [f"img {i + 1} (id {emb.data.images[int(emb.rows[r])].image_id})" for i, r in enumerate(rows)]
    return sim, labels, owner


def data_samples(data: CaptionedImages, n: int = 6, seed: int = 0) -> list[dict]:
    """n random images of a split with all their captions (for `clipft inspect-data`)."""
    return [{"path": data.images[i].path, "captions": data.images[i].captions, "image_id": data.images[i].image_id}
            for i in _sample(len(data), n, seed)]


def write_data_samples(data_root: str | Path, split: str, cfg, out: str | Path, n: int = 6, seed: int = 0
                       ) -> tuple[CaptionedImages, list[dict], Path]:
    """`clipft inspect-data`: a picture of n random image-caption pairs of a split at `out`;
    returns (the split, the samples shown, the file written)."""
    from ..data import load_split
    from .plots import plot_data_samples
    data = load_split(Path(data_root), split, cfg.data)
    samples = data_samples(data, n, seed)
    written = plot_data_samples(samples, out, title=f"{n} random image-caption pairs of {data.name}")
    return data, samples, written


def embed_queries(cfg, queries: Sequence[str], device: str = "cpu") -> torch.Tensor:
    """Free-text queries -> [Q, D] with the checkpoint's frozen text encoder (no cache: a handful)."""
    from ..text import load_text_encoder
    enc = load_text_encoder(cfg.text.encoder, device=device, max_length=cfg.text.max_length, amp=cfg.train.amp)
    return enc.encode(list(queries))


def write_pictures(emb: SplitEmbeddings, out_dir: str | Path, n: int = 4, seed: int = 0,
                   heatmap_images: int = 10) -> dict[str, Path]:
    """The three retrieval pictures of a split into out_dir (default names above): text->image for
    n dataset captions, image->text for n images, and the similarity heatmap."""
    from .plots import plot_image_to_text, plot_similarity_heatmap, plot_text_to_image
    out_dir = Path(out_dir)
    sim, labels, owner = heatmap_data(emb, heatmap_images, seed)
    return {
        "text_to_image": plot_text_to_image(text_to_image_results(emb, n=n, seed=seed), out_dir / TEXT_TO_IMAGE_PNG),
        "image_to_text": plot_image_to_text(image_to_text_results(emb, n=n, seed=seed), out_dir / IMAGE_TO_TEXT_PNG),
        "heatmap": plot_similarity_heatmap(sim, labels, owner, out_dir / HEATMAP_PNG),
    }


KINDS = ("text-to-image", "image-to-text", "heatmap", "zero-shot", "all")  # `clipft visualize` kinds with a checkpoint


def _picture_path(out: str | Path | None, kind: str, default: Path) -> Path:
    """`out` is a file for one picture, a directory for `all` (and for zero-shot's two files)."""
    if not out:
        return default
    out = Path(out)
    return out / default.name if kind in ("all", "zero-shot") else out


def write_visualization(kind: str, checkpoint: str | Path, data_root: str | Path, split: str = "val",
                        cfg=None, device: str = "auto", karpathy: str | Path | None = None,
                        embeddings_file: str | Path | None = None, queries: Sequence[str] | None = None,
                        n: int = 4, seed: int = 0, heatmap_images: int = 10, labels: Sequence[str] | None = None,
                        labels_from: str | None = None, templates: Sequence[str] | None = None,
                        out: str | Path | None = None, progress: bool = False) -> tuple[list[Path], list[str]]:
    """The pictures of `kind` (see KINDS) for a checkpoint on a split: (files written, notes for the user).

    The split is embedded once (or read from `embeddings_file`, a `--save-embeddings` file); pictures
    go beside the checkpoint unless `out` says otherwise (see `_picture_path`). `cfg` defaults to the
    checkpoint's config. "all" skips the zero-shot picture (with a note) when nothing labels the split.
    """
    from .evaluate import checkpoint_embeddings, split_embeddings_from_file
    from .plots import plot_image_to_text, plot_similarity_heatmap, plot_text_to_image
    if embeddings_file:
        emb, cfg = split_embeddings_from_file(embeddings_file, checkpoint, data_root, split, cfg, karpathy)
    else:
        emb, cfg = checkpoint_embeddings(checkpoint, data_root, split, cfg, device, karpathy, progress=progress)
    out_dir = Path(checkpoint).parent
    written: list[Path] = []
    notes: list[str] = []
    if kind in ("text-to-image", "all"):
        from ..runtime import resolve_device
        dev = resolve_device(device if device != "auto" else cfg.train.device)
        q_emb = embed_queries(cfg, queries, dev) if queries else None
        rows = text_to_image_results(emb, queries, q_emb, n=n, seed=seed)
        written.append(plot_text_to_image(rows, _picture_path(out, kind, out_dir / TEXT_TO_IMAGE_PNG)))
    if kind in ("image-to-text", "all"):
        written.append(plot_image_to_text(image_to_text_results(emb, n=n, seed=seed),
                                          _picture_path(out, kind, out_dir / IMAGE_TO_TEXT_PNG)))
    if kind in ("heatmap", "all"):
        sim, labels_, owner = heatmap_data(emb, heatmap_images, seed)
        written.append(plot_similarity_heatmap(sim, labels_, owner, _picture_path(out, kind, out_dir / HEATMAP_PNG)))
    ds_split = cfg.data.val_split if split in VAL_PROTOCOLS else split
    shapes_labels = Path(data_root) / "annotations" / f"shapes_labels_{ds_split}2014.json"
    if kind == "all" and not labels_from and not shapes_labels.is_file():
        notes.append("zero-shot picture skipped: no --labels-from and the dataset has no shapes labels")
    elif kind in ("zero-shot", "all"):
        from .zeroshot import zeroshot_dataset
        r = zeroshot_dataset(checkpoint, data_root, labels_from=labels_from or "shapes", labels=labels,
                             templates=templates, cfg=cfg, device=device, embeddings=emb,
                             out_dir=_picture_path(out, kind, out_dir / "x").parent, n_examples=2 * n, seed=seed)
        written += [Path(r["examples_png"]), Path(r["confusion_png"])]
    return written, notes
