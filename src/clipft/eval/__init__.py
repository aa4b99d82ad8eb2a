"""Evaluation: what a trained tower is worth, measured and shown.

`metrics` holds the retrieval metrics (pure functions over embeddings), `evaluate` the evaluation of
a checkpoint on a split, `protocols` which images and captions a figure is computed on, `zeroshot`
zero-shot classification, `clip_baseline` the original CLIP model as a reference, `pictures` and
`plots` the retrieval grids and charts.
"""
