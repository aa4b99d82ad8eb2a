"""Flickr loading time at the real size: reading one split of a Flickr30k-sized folder.

Inputs, written to a temp dir: 31,783 empty image files named like Flickr30k's (`<digits>.jpg`; the
loader lists the image folder but never opens an image), and a caption file with 5 captions each
(158,915 lines) in the chosen layout: the official `results_20130124.token` or Kaggle's
`flickr30k_images/results.csv`; with --karpathy also a `dataset_flickr30k.json` (29,000 / 1,014 /
1,000 images) that then defines the splits. Reported: the median of --rounds loads of the test
split (each load parses the whole caption file and lists the image folder, as training does).

    python benchmarks/flickr_load.py [--layout token|kaggle] [--karpathy] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from clipft.data.flickr import load_flickr

N_IMAGES = 31_783


def write_folder(root: Path, layout: str, karpathy: bool) -> None:
    names = [f"{1000092795 + 7 * i}.jpg" for i in range(N_IMAGES)]
    caption = "Two young guys with shaggy hair look at their hands while hanging out in the yard ."
    if layout == "token":
        images = root / "flickr30k-images"
        text = "".join(f"{n}#{k}\t{caption}\n" for n in names for k in range(5))
        (root / "results_20130124.token").write_text(text)
    else:
        images = root / "flickr30k_images" / "flickr30k_images"
        text = "image_name| comment_number| comment\n" + "".join(f"{n}| {k}| {caption}\n" for n in names
                                                                  for k in range(5))
        images.mkdir(parents=True)
        (root / "flickr30k_images" / "results.csv").write_text(text)
    images.mkdir(parents=True, exist_ok=True)
    for n in names:
        (images / n).touch()
    if karpathy:
        split = ["test"] * 1000 + ["val"] * 1014 + ["train"] * (N_IMAGES - 2014)
        (root / "dataset_flickr30k.json").write_text(json.dumps({"dataset": "flickr30k", "images": [
            {"imgid": i, "filename": n, "split": s, "sentences": [{"raw": caption, "sentid": 5 * i + k}
                                                                   for k in range(5)]}
            for i, (n, s) in enumerate(zip(names, split))]}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layout", choices=["token", "kaggle"], default="token")
    p.add_argument("--karpathy", action="store_true")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_folder(root, args.layout, args.karpathy)
        times, test = [], None
        for _ in range(args.rounds):
            t = time.perf_counter()
            test = load_flickr(root, "test")
            times.append(time.perf_counter() - t)
    print(f"{args.layout}{' + karpathy' if args.karpathy else ''}: test split {len(test):,} images x "
          f"{len(test.captions):,} captions ({test.split_origin}); median load {statistics.median(times):.2f} s "
          f"over {args.rounds} rounds")


if __name__ == "__main__":
    main()
