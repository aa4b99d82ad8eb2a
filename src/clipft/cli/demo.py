"""The embedded end-to-end demo (`clipft demo`, `make demo`): shapes data -> MiniLM text cache ->
train -> evaluate -> zero-shot -> pictures -> report, on CPU and offline.

Like `ablate`, this module drives training; `say` receives the progress lines the command prints.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

from ..config import PRESETS, ConfigError, preset_config

DEMO_TRAIN_IMAGES = PRESETS["demo"]["data"]["train_images"]
DEMO_VAL_IMAGES = PRESETS["demo"]["data"]["val_images"]
STEPS = 7  # data, train, evaluate, zero-shot, pictures, report, search: each line says [i/STEPS]


def check_demo_data(data: str | Path | None) -> None:
    """`demo --data`: a COCO-layout dataset to use, or a new or empty folder for the synthetic one. Any other
    folder is refused: the demo would write train2014/, val2014/ and annotations/ into someone's photos."""
    if data is None:
        return
    p = Path(data)
    if p.exists() and not p.is_dir():
        raise ConfigError(f"{p}: a file, not a folder; demo --data takes a COCO-layout dataset folder, or a new "
                          "folder for the synthetic one")
    if p.is_dir() and not (p / "annotations" / "captions_val2014.json").is_file() and any(p.iterdir()):
        raise ConfigError(f"{p}: not a COCO-layout dataset (no annotations/captions_val2014.json), and not empty: "
                          "the demo writes its synthetic dataset only into a new or empty folder; give one, or "
                          "leave --data out (OUT/data)")


def run_demo(out: str | Path, data: str | Path | None = None, train_images: int = DEMO_TRAIN_IMAGES,
             val_images: int = DEMO_VAL_IMAGES, overrides: Sequence[str] = (), progress: bool = True,
             say: Callable[[str], None] = print, resume: bool = True,
             before_report: Callable[[], None] | None = None) -> dict:
    """Run the six demo steps into `out` (the dataset in OUT/data unless `data` is given; generated when
    absent). A rerun resumes the run already there (resume=False: trains it again from scratch). Returns {"metrics", "zero_shot" (or None), "report"}.
    before_report() runs just before the report is written (the CLI records the command line in
    RUN/commands.txt there, so that the report's Reproduce section lists it)."""
    check_demo_data(data)  # before the imports: a wrong folder answers at once
    from ..data import load_split
    from ..data.shapes import make_shapes_dataset
    from ..eval.evaluate import checkpoint_embeddings, evaluate_checkpoint, format_recall_table
    from ..eval.pictures import DATA_SAMPLES_PNG, data_samples, write_pictures
    from ..report import write_report
    from ..train.rundir import resolve_run_config
    from ..train.loop import train
    from ..eval.plots import plot_data_samples
    from ..eval.zeroshot import zeroshot_dataset

    from ..threads import replan
    out = Path(out)
    data = Path(data) if data else out / "data"
    # Twice the validation images: the seeded half (data.val_images) chooses best.pt, the other half
    # is held out (protocol val-heldout) for the figures the demo reports, free of selection bias.
    if not (data / "annotations" / "captions_val2014.json").is_file():
        say(f"[1/{STEPS}] writing the synthetic shapes dataset to {data}")
        make_shapes_dataset(data, n_train=train_images, n_val=2 * val_images, seed=0)
    else:
        say(f"[1/{STEPS}] using the dataset already in {data}")
    sizes = [f"data.train_images={train_images}", f"data.val_images={val_images}"]
    cfg = resolve_run_config(out, None, sizes + list(overrides), base=preset_config("demo"), resume=resume)
    train_split = load_split(data, cfg.data.train_split, cfg.data)
    plot_data_samples(data_samples(train_split, 4), out / DATA_SAMPLES_PNG,
                      title=f"4 random image-caption pairs of the training split ({train_split.name})")
    say(f"[2/{STEPS}] training {cfg.model.backbone} against frozen {cfg.text.encoder} for {cfg.train.epochs} epochs "
        f"(best.pt chosen on {cfg.data.val_images} validation images)")
    train(cfg, data, out, resume=resume, progress=progress)
    replan()  # each step sizes its threads to the machine as it is now
    say(f"[3/{STEPS}] evaluating best.pt on the held-out validation images (not used to choose it)")
    emb, _ = checkpoint_embeddings(out / "best.pt", data, "val-heldout", progress=progress)
    m = evaluate_checkpoint(out / "best.pt", data, split="val-heldout", embeddings=emb)
    say(m["protocol"])
    say(format_recall_table(m))
    replan()
    say(f"[4/{STEPS}] zero-shot classification of the held-out images (colour + shape of the largest object)")
    z = None
    if (data / "annotations" / f"shapes_labels_{cfg.data.val_split}2014.json").is_file():
        z = zeroshot_dataset(out / "best.pt", data, split="val-heldout", labels_from="shapes", embeddings=emb)
        say(f"top-1 {z['top1']:.1f}%, top-5 {z['top5']:.1f}% over {len(z['classes'])} classes "
            f"(chance {z['chance_top1']:.1f}%), {z['num_images']} images")
    else:
        say(f"skipped: {data} has no shapes labels")
    replan()
    say(f"[5/{STEPS}] retrieval pictures (held-out images)")
    write_pictures(emb, out)
    if before_report is not None:
        before_report()
    report = write_report(out)
    say(f"[6/{STEPS}] wrote {report}")
    if (data / "annotations" / f"shapes_labels_{cfg.data.val_split}2014.json").is_file():
        # The loop closed: search the validation images with the model just trained.
        from ..search.quality import demo_search
        replan()
        say(f"[7/{STEPS}] searching the validation images with the model just trained")
        say(demo_search(out / "best.pt", data, cfg.data.val_split, out / "search-index"))
    return {"metrics": m, "zero_shot": z, "report": report}
