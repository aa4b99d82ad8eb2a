"""How good a search is, measured from labels: precision@k of text queries whose relevant images are
known, e.g. "a red circle" on the synthetic shapes data (relevant: an image holding a red circle).
Also the embedded demo's last step, which indexes its validation images and shows a search."""

from __future__ import annotations

import itertools
from pathlib import Path

from ..data.shapes import COLORS, SHAPES, load_shapes_labels
from .index import update_index
from .query import LoadedIndex, load_index, search_text


def shapes_queries(root: str | Path, split: str = "val", min_relevant: int = 3) -> dict[str, set[str]]:
    """{"a <colour> <shape>": file names of the images holding such an object} for every colour+shape
    with at least `min_relevant` images in the split (file names as `make_shapes_dataset` writes them)."""
    labels = load_shapes_labels(root, split)
    queries = {}
    for colour, shape in itertools.product(COLORS, SHAPES):
        rel = {f"COCO_{split}2014_{i:012d}.jpg" for i, objs in labels.items()
               if any(o["color"] == colour and o["shape"] == shape for o in objs)}
        if len(rel) >= min_relevant:
            queries[f"a {colour} {shape}"] = rel
    return queries


def precision_at_k(idx: LoadedIndex, model, queries: dict[str, set[str]], k: int = 10) -> dict:
    """Mean precision@k of the text queries (a hit counts when its file name is relevant), beside the
    chance level: the mean fraction of relevant images, what a random ranking scores on average."""
    names = [Path(p).name for p in idx.paths]
    precisions, chances = [], []
    for text, relevant in queries.items():
        hits = search_text(idx, model, text, k)
        precisions.append(sum(Path(h.path).name in relevant for h in hits) / k)
        chances.append(sum(n in relevant for n in names) / max(1, len(names)))
    n = max(1, len(queries))
    return {"queries": len(queries), "k": k, "precision": sum(precisions) / n, "chance": sum(chances) / n}


def demo_search(checkpoint: Path, data: Path, split: str, index_dir: Path, query: str = "a red circle") -> str:
    """Index the demo's validation images with its trained model; report precision@10 of the
    colour+shape queries, one sample search, and the command that opens them in a browser."""
    from ..inference import load
    from .query import model_source
    model = load(checkpoint)
    images = Path(data) / f"{split}2014"
    # rebuild: the demo's own index always follows its current best.pt (a resumed or restarted demo
    # trains a new one; a few seconds for its 1,000 images).
    stats = update_index(images, model, index_dir, model_source=model_source(str(checkpoint)), rebuild=True,
                         progress=False)
    idx = load_index(index_dir, use_ann=False)
    p = precision_at_k(idx, model, shapes_queries(data, split))
    return "\n".join([
        f"indexed {images}: {stats.summary()}",
        f"precision@10 of {p['queries']} colour+shape text queries: {100 * p['precision']:.1f}% "
        f"(chance {100 * p['chance']:.1f}%)",
        f'search "{query}":',
        *(f"  {h.score:7.4f}  {h.path}" for h in search_text(idx, model, query, 5)),
        f"search them in your browser: clipft serve --index {index_dir}"])
