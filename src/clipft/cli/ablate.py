"""Ablation study: named modifications of one base config, trained with everything else identical
(data, seeds, budget), compared against the baseline in a table and two charts.

A modification is data: a nested mapping of config overrides, exactly like `config.PRESETS`
(`ABLATIONS` below, or a user YAML file of `name: {section: {key: value}}` entries). Each
(configuration, seed) pair is one ordinary `train.train` run in its own directory:

  DIR/runs/<configuration>/seed_<S>/   config.json, metrics.jsonl, last.pt, summary.json, ...
  DIR/ablation.md, DIR/ablation.csv    one row per configuration (mean and std over seeds)
  DIR/ablation_recall.png              Recall@K change against the baseline, grouped bars
  DIR/ablation_curves.png              validation Recall@5 per epoch for every configuration
  DIR/ablation.json                    everything above as data, plus the per-run values

A run is complete when its summary.json exists and its last epoch record is the final epoch;
complete runs are skipped, half-finished ones continue through train's own exact resume, so an
interrupted study is resumed by rerunning the same command.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..train import loop as trainer
from ..config import (PRESETS, Config, ConfigError, from_dict, load_config, preset_config, save_config, validate,
                     to_dict, update_from_dict)
from ..model import fill_weights_sha256
from ..train.resume import config_differences
from ..train.rundir import RunFiles, read_records

log = logging.getLogger(__name__)

# The named configurations and their checks: torch-free, so that a typo is refused at once (ablations.py).
from .ablations import (ABLATION_NOTES, ABLATIONS, DEMO_DATA_SIZES, QUICK_CONFIGS, QUICK_DATA_SIZES,  # noqa: E402,F401
                        QUICK_OVERRIDES, AblationError, describe, format_list, load_ablations_file,
                        select_configs)


IGNORED_KEYS = {"data.num_workers", "train.log_every", "text.batch_size", "text.cache_dir", "eval.batch_size",
                "train.checkpoint_every"}
FAILED_MARK = "ablation_failed.txt"


# --------------------------------------------------------------------------- planning

@dataclass
class StudyRun:
    """One (configuration, seed) training run of a study."""
    config: str
    seed: int
    dir: Path
    cfg: Config


def validate_config(cfg: Config, where: str) -> None:
    """Refuse values the run would only reject after data loading: every range and choice of the
    schema (`config.validate`), then the model options (built on the meta device: no memory, no
    download)."""
    from ..model import ModelError, build_image_tower
    try:
        validate(cfg, source=where)
        with torch.device("meta"):
            build_image_tower(from_dict({"model": {**to_dict(cfg)["model"], "image_weights": "none"}}).model, 8)
    except (ConfigError, ModelError) as e:
        raise AblationError(str(e) if isinstance(e, ConfigError) else f"{where}: {e}") from None


def plan_study(base: Config, configs: dict[str, dict], seeds: Sequence[int], out_dir: str | Path) -> list[StudyRun]:
    """The runs of a study, configuration-major: base config + the configuration's overrides, with
    train.seed set per seed (the data subset, data.subset_seed, stays the same for all)."""
    if not seeds:
        raise AblationError("--seeds: give at least one seed")
    if len(set(seeds)) != len(seeds):
        raise AblationError(f"--seeds: repeated seed in {list(seeds)}")
    runs = []
    for name, overrides in configs.items():
        try:  # a value outside the schema's choices is refused as it is set
            cfg0 = update_from_dict(from_dict(to_dict(base)), overrides, source=f"configuration {name}")
        except ConfigError as e:
            raise AblationError(str(e)) from None
        validate_config(cfg0, f"configuration {name}")
        # The trainer records a weights file's sha256 in the run's config.json; record it here too, so a
        # rerun of the study compares like with like (and a file changed since is "another config").
        fill_weights_sha256(cfg0.model)
        for seed in seeds:
            cfg = from_dict(to_dict(cfg0))
            cfg.train.seed = int(seed)
            runs.append(StudyRun(name, int(seed), Path(out_dir) / "runs" / name / f"seed_{seed}", cfg))
    return runs


def run_status(run: StudyRun) -> str:
    """"new", "partial" (train resumes it), "complete" or "failed" (failed or diverged before; delete the
    directory to retry). A directory holding a run of another config is an AblationError: its
    results would be silently mixed into the comparison."""
    files = RunFiles(run.dir)
    if not files.config.is_file():
        return "new"
    diffs = config_differences(json.loads(files.config.read_text()), run.cfg, IGNORED_KEYS)
    if diffs:
        raise AblationError(f"{run.dir}: holds a run with another config ({'; '.join(diffs[:4])}"
                            f"{'; ...' if len(diffs) > 4 else ''}); use another --out or delete that directory")
    if (run.dir / FAILED_MARK).is_file():
        return "failed"
    epochs = read_records(files.metrics, "epoch")
    if files.summary.is_file() and epochs and epochs[-1]["epoch"] == run.cfg.train.epochs and "val" in epochs[-1]:
        return "complete"
    return "partial"


# --------------------------------------------------------------------------- running

def ensure_data(out_dir: str | Path, quick: bool) -> Path:
    """The default target: the embedded synthetic shapes data (COCO 2014 layout) under
    DIR/data (DIR/data-quick with --quick), generated once."""
    from ..data.shapes import make_shapes_dataset
    n_train, n_val = QUICK_DATA_SIZES if quick else DEMO_DATA_SIZES
    root = Path(out_dir) / ("data-quick" if quick else "data")
    if not (root / "annotations" / "captions_val2014.json").is_file():
        log.info("writing the synthetic shapes dataset (%d train / %d val images) to %s", n_train, n_val, root)
        make_shapes_dataset(root, n_train=n_train, n_val=n_val, seed=0, image_size=64 if quick else 128)
    return root


def study_base_config(base_config: str | None = "demo", overrides: Sequence[str] = (), quick: bool = False) -> Config:
    """Base config of a study: a preset name or a YAML file (default: the demo preset), then the
    --quick budget, then the user's overrides."""
    name = base_config or "demo"
    if Path(name).is_file():
        cfg = load_config(name)
    elif name in PRESETS:
        cfg = preset_config(name)
    else:
        raise AblationError(f"--base-config {name!r}: neither a config file nor a preset "
                            f"(presets: {', '.join(PRESETS)})")
    if quick:
        update_from_dict(cfg, QUICK_OVERRIDES, source="--quick budget")
    return load_config(None, list(overrides), base=cfg)


def run_study(out_dir: str | Path, data_root: str | Path | None = None, names: Sequence[str] | None = None,
              seeds: Sequence[int] = (0,), base_config: str | None = "demo", overrides: Sequence[str] = (),
              configs_file: str | Path | None = None, quick: bool = False, progress: bool = False,
              train_fn: Callable[..., dict] | None = None) -> dict:
    """Run (or resume) a study and write its table and charts; returns the ablation.json dict.

    Runs whose training diverges (TrainingError) are recorded as failed and the study goes on;
    any other error stops it (rerun the command to resume). train_fn replaces `train.train` (same
    signature; a seam for tests)."""
    out_dir = Path(out_dir)
    user = load_ablations_file(configs_file) if configs_file else {}
    configs = select_configs(names, user, quick)
    base = study_base_config(base_config, overrides, quick)
    runs = plan_study(base, configs, seeds, out_dir)
    statuses = {id(r): run_status(r) for r in runs}  # all directories checked before anything trains
    out_dir.mkdir(parents=True, exist_ok=True)
    data_root = Path(data_root) if data_root else ensure_data(out_dir, quick)
    t0 = time.time()
    for i, run in enumerate(runs, 1):
        status = statuses[id(run)]
        tag = f"[{i}/{len(runs)}] {run.config} seed {run.seed}"
        if status in ("complete", "failed"):
            log.info("%s: %s, skipped", tag, status)
            continue
        log.info("%s: %s -> %s", tag, "resuming" if status == "partial" else "training", run.dir)
        try:
            (train_fn or trainer.train)(run.cfg, data_root, run.dir, resume=True, progress=progress)
        except trainer.TrainingError as e:
            run.dir.mkdir(parents=True, exist_ok=True)
            if not (run.dir / "config.json").is_file():  # keep the config check working for it
                save_config(run.cfg, run.dir / "config.json")
            (run.dir / FAILED_MARK).write_text(f"{e}\n")
            log.error("%s failed: %s", tag, e)
    study = collect_study(runs, configs, base, data_root, seeds, base_config=base_config or "demo",
                          overrides=overrides, quick=quick)
    study["wall_seconds_this_invocation"] = time.time() - t0
    write_study(out_dir, study)
    return study


# --------------------------------------------------------------------------- results

def run_result(run: StudyRun) -> dict:
    """The values of one run, read from its own files: final-epoch validation Recall@K from
    metrics.jsonl (the source of truth), training time and parameter counts from summary.json."""
    files = RunFiles(run.dir)
    out: dict[str, Any] = {"config": run.config, "seed": run.seed, "dir": str(run.dir)}
    if (run.dir / FAILED_MARK).is_file():
        error = (run.dir / FAILED_MARK).read_text().strip()
        return {**out, "status": "diverged" if "diverged" in error else "failed", "error": error}
    epochs = read_records(files.metrics, "epoch")
    if not files.summary.is_file() or not epochs or "val" not in epochs[-1]:
        return {**out, "status": "missing"}
    summary = json.loads(files.summary.read_text())
    final = epochs[-1]["val"]
    metrics = {f"{d}_{k}": float(v) for d in ("image_to_text", "text_to_image") for k, v in final[d].items()}
    metrics["mean_recall"] = sum(metrics.values()) / len(metrics)
    curve = [{"epoch": r["epoch"], **{f"{d}_R@5": r["val"][d].get("R@5") for d in ("image_to_text", "text_to_image")}}
             for r in epochs if "val" in r]
    return {**out, "status": "ok", "epoch": epochs[-1]["epoch"], "metrics": metrics, "curve": curve,
            "train_seconds": float(summary.get("train_seconds", float("nan"))),
            "trainable_params": int(summary.get("parameters", {}).get("trainable", 0)),
            "total_params": int(summary.get("parameters", {}).get("total", 0)),
            "num_val_images": final.get("num_images"), "num_val_captions": final.get("num_captions"),
            "dataset": summary.get("dataset", {}), "hardware": summary.get("hardware", {})}


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _std(xs: list[float]) -> float | None:
    return statistics.stdev(xs) if len(xs) >= 2 else None  # sample std (n - 1)


def summarise(results: list[dict], configs: dict[str, dict]) -> list[dict]:
    """One row per configuration: mean and sample std over its seeds of every metric; the change
    against the baseline, paired by seed (config seed s - baseline seed s), its std, and on how
    many seeds the mean recall went up; mean training time; trainable parameters."""
    ok = [r for r in results if r["status"] == "ok"]
    metric_names = list(ok[0]["metrics"]) if ok else []
    base = {r["seed"]: r["metrics"] for r in ok if r["config"] == "baseline"}
    rows = []
    for name, overrides in configs.items():
        mine = [r for r in results if r["config"] == name]
        # A configuration that diverged on any seed is never ranked: its other seeds' figures
        # would make an unstable setting look as good as a stable one.
        good = [] if any(r["status"] == "diverged" for r in mine) else [r for r in mine if r["status"] == "ok"]
        row: dict[str, Any] = {"config": name, "overrides": describe(overrides),
                               "seeds": " ".join(str(r["seed"]) for r in mine), "runs_ok": len(good),
                               "status": "ok" if len(good) == len(mine) else
                               ", ".join(f"seed {r['seed']} {r['status']}" for r in mine if r["status"] != "ok")}
        for m in metric_names:
            vals = [r["metrics"][m] for r in good]
            row[m], row[f"{m}_std"] = _mean(vals), _std(vals)
        for m in metric_names:
            diffs = [r["metrics"][m] - base[r["seed"]][m] for r in good if r["seed"] in base]
            row[f"delta_{m}"] = _mean(diffs)
            row[f"delta_{m}_std"] = _std(diffs)
            if m == "mean_recall":
                up = f"{sum(d > 0 for d in diffs)}/{len(diffs)}"
                row["seeds_improved"] = up if diffs and name != "baseline" else ""
        row["train_seconds"] = _mean([r["train_seconds"] for r in good])
        row["trainable_params"] = good[0]["trainable_params"] if good else None
        row["total_params"] = good[0]["total_params"] if good else None
        rows.append(row)
    return rows


def collect_study(runs: list[StudyRun], configs: dict[str, dict], base: Config, data_root: Path,
                  seeds: Sequence[int], base_config: str = "demo", overrides: Sequence[str] = (),
                  quick: bool = False) -> dict:
    """The whole study as data (what ablation.json holds and the table/charts are drawn from)."""
    results = [run_result(r) for r in runs]
    ok = [r for r in results if r["status"] == "ok"]
    return {"data_root": str(data_root), "base_config": base_config, "overrides": list(overrides),
            "quick": quick, "seeds": [int(s) for s in seeds], "base": to_dict(base),
            "configs": {n: {"overrides": o, "about": ABLATION_NOTES.get(n, describe(o))} for n, o in configs.items()},
            "metric_names": list(ok[0]["metrics"]) if ok else [],
            "dataset": ok[0]["dataset"] if ok else {}, "hardware": ok[0]["hardware"] if ok else {},
            "num_val_images": ok[0]["num_val_images"] if ok else None,
            "num_val_captions": ok[0]["num_val_captions"] if ok else None,
            "rows": summarise(results, configs), "runs": results}


# --------------------------------------------------------------------------- outputs

def _num(x: float | None, digits: int = 2) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _pm(mean: float | None, std: float | None, signed: bool = False) -> str:
    if mean is None:
        return "-"
    s = f"{mean:+.2f}" if signed else f"{mean:.2f}"
    return s + (f" ± {std:.2f}" if std is not None else "")


def _seconds(s: float | None) -> str:
    if s is None or math.isnan(s):
        return "-"
    s = int(round(s))
    return f"{s // 3600}h {s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m {s % 60:02d}s"


def write_csv(path: Path, study: dict) -> Path:
    """ablation.csv: one row per configuration; *_std columns empty with a single seed."""
    ms = study["metric_names"]
    fields = (["config", "overrides", "seeds", "runs_ok", "status"]
              + [c for m in ms for c in (m, f"{m}_std")]
              + [c for m in ms for c in (f"delta_{m}", f"delta_{m}_std")]
              + ["seeds_improved", "train_seconds", "trainable_params", "total_params"])
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for row in study["rows"]:
            w.writerow({k: ("" if row.get(k) is None else
                            f"{row[k]:.4f}" if isinstance(row.get(k), float) else row.get(k)) for k in fields})
    return path


def write_markdown(path: Path, study: dict) -> Path:
    """ablation.md: setup, the comparison table, how to read it, the charts."""
    rows, ms = study["rows"], study["metric_names"]
    base, seeds = study["base"], study["seeds"]
    several = len(seeds) > 1
    ds, hw = study.get("dataset", {}), study.get("hardware", {})
    t, m = base["train"], base["model"]
    lines = ["# Ablation study", ""]
    lines += [f"- Base config: `{study['base_config']}`" + (" with the `--quick` budget" if study["quick"] else "")
              + (f", overrides `{' '.join(study['overrides'])}`" if study["overrides"] else "")
              + f": {m['backbone']} (init {m['image_weights']}), head hidden {m['head_hidden']}, "
              f"text encoder `{base['text']['encoder']}`, {t['epochs']} epochs x batch {t['batch_size']}, "
              f"lr {t['lr']}, warmup {t['warmup_steps']} steps, image size {base['data']['image_size']} px.",
              f"- Data: `{study['data_root']}`"
              + (f" ({ds.get('train_images')} train images / {ds.get('train_captions')} captions)" if ds else "") + ".",
              f"- Seeds: {' '.join(map(str, seeds))} (train.seed: weight init, shuffling, caption choice, "
              "augmentation; the data subset is the same for all runs). Every configuration runs with exactly "
              "the same data, seeds and budget; only its overrides differ.",
              f"- Metrics: validation split after the final epoch, COCO protocol, {study.get('num_val_images')} "
              f"images x {study.get('num_val_captions')} captions (all captions per image). Recall@K in %; "
              "mean R = mean of the six Recall@K values."]
    if hw:
        lines.append(f"- Hardware: {hw.get('device')}: {hw.get('gpu') or hw.get('cpu')} "
                     f"({hw.get('cpu_count')} cores), torch {hw.get('torch')}.")
    lines.append("")
    k_names = [n.split("_", 3)[-1] for n in ms if n.startswith("image_to_text_")]
    head = (["configuration"] + [f"i2t {k}" for k in k_names] + [f"t2i {k}" for k in k_names]
            + ["mean R", "Δ mean R vs baseline", "train time / run", "trainable params"])
    lines += ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for row in rows:
        cells = [f"`{row['config']}`"]
        for mname in [n for n in ms if n != "mean_recall"] + ["mean_recall"]:
            cells.append(_pm(row.get(mname), row.get(f"{mname}_std")))
        if row["config"] == "baseline":
            delta = "(reference)"
        else:
            delta = _pm(row.get("delta_mean_recall"), row.get("delta_mean_recall_std"), signed=True)
            if several and row.get("seeds_improved"):
                delta += f" (up on {row['seeds_improved']} seeds)"
        cells += [delta, _seconds(row.get("train_seconds")),
                  f"{row['trainable_params']:,}" if row.get("trainable_params") else "-"]
        if row["status"] != "ok":
            cells[0] += f" ({row['status']})"
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "How to read it:", ""]
    if several:
        lines += ["- Cells are mean ± sample standard deviation over the seeds. Δ is paired by seed (configuration "
                  "seed s minus baseline seed s), given as mean ± std of those differences; a change that is "
                  "smaller than its std, or that does not go the same way on every seed, is noise."]
    else:
        lines += ["- One seed per configuration: a difference of a point or two can be seed noise. Rerun with "
                  "`--seeds 0 1 2` (finished runs are kept) to get standard deviations."]
    lines += ["- Train time is the training loop's time per run (with its per-epoch validation), averaged over seeds; "
              "trainable parameters are counted at the end of training.", "",
              "## Changes against the baseline", "", "![Recall@K change against the baseline](ablation_recall.png)", "",
              "## Validation Recall@5 per epoch", "", "![validation Recall@5 per epoch](ablation_curves.png)", "",
              "## Configurations", "", "| configuration | what it changes | overrides |", "|---|---|---|"]
    for name, c in study["configs"].items():
        lines.append(f"| `{name}` | {c['about']} | `{describe(c['overrides'])}` |")
    failed = [r for r in study["runs"] if r["status"] in ("failed", "diverged")]
    if failed:
        lines += ["", "## Failed runs", "", "A configuration with a diverged seed is not ranked (no figures).", ""]
        lines += [f"- `{r['config']}` seed {r['seed']} {r['status']}: {r['error']} "
                                              f"(delete `{r['dir']}` to retry)" for r in failed]
    lines.append("")
    path.write_text("\n".join(lines))
    return path


def recall_delta_bars(study: dict) -> dict:
    """What ablation_recall.png draws: configs (x, baseline excluded), metrics (one bar each),
    values[metric][config] = change against the baseline, errors = std of the per-seed changes."""
    ms = [n for n in study["metric_names"] if n != "mean_recall"]
    rows = [r for r in study["rows"] if r["config"] != "baseline" and ms and r.get(f"delta_{ms[0]}") is not None]
    return {"configs": [r["config"] for r in rows], "metrics": ms,
            "values": [[r[f"delta_{m}"] for r in rows] for m in ms],
            "errors": [[r.get(f"delta_{m}_std") or 0.0 for r in rows] for m in ms]}


def plot_recall_deltas(path: Path, study: dict) -> Path:
    """Grouped bars: per configuration (x), the change of each Recall@K against the baseline
    (percentage points), error bars = std of the per-seed differences."""
    from ..eval.plots import plt
    bars = recall_delta_bars(study)
    configs, ms = bars["configs"], bars["metrics"]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(configs) + 3), 4.8))
    width = 0.8 / max(1, len(ms))
    colors = plt.get_cmap("tab20c")
    for j, mname in enumerate(ms):
        xs = [i + (j - (len(ms) - 1) / 2) * width for i in range(len(configs))]
        err = bars["errors"][j]
        label = mname.replace("image_to_text_", "image->text ").replace("text_to_image_", "text->image ")
        ax.bar(xs, bars["values"][j], width, yerr=err if any(err) else None, capsize=2, label=label,
               color=colors(j if j < 3 else j + 1))
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(range(len(configs)))
    ax.set_xticklabels(configs, rotation=30, ha="right")
    ax.set_ylabel("Recall@K change vs baseline (points)")
    n = len(study["seeds"])
    ax.set_title("Recall@K change against the baseline" + (f" (mean of {n} seeds, ± std)" if n > 1 else " (1 seed)"))
    ax.grid(axis="y", alpha=0.3)
    if configs:
        ax.legend(fontsize=8, ncol=2)
    else:
        ax.text(0.5, 0.5, "no modification with results", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def recall_curves(study: dict) -> dict[str, dict[str, list[dict]]]:
    """What ablation_curves.png draws: config -> direction -> [{epoch, mean, min, max}] of the
    validation R@5 over the configuration's successful seeds."""
    ok = [r for r in study["runs"] if r["status"] == "ok"]
    out: dict[str, dict[str, list[dict]]] = {}
    for name in study["configs"]:
        curves = [r["curve"] for r in ok if r["config"] == name]
        if not curves:
            continue
        out[name] = {}
        for d in ("image_to_text", "text_to_image"):
            points = []
            for e in sorted({p["epoch"] for c in curves for p in c}):
                v = [p[f"{d}_R@5"] for c in curves for p in c if p["epoch"] == e and p.get(f"{d}_R@5") is not None]
                if v:
                    points.append({"epoch": e, "mean": sum(v) / len(v), "min": min(v), "max": max(v), "n": len(v)})
            out[name][d] = points
    return out


def plot_recall_curves(path: Path, study: dict) -> Path:
    """Validation Recall@5 per epoch for every configuration (mean over seeds, band = min..max),
    one panel per direction."""
    from matplotlib.ticker import MaxNLocator

    from ..eval.plots import plt
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    curves = recall_curves(study)
    for ax, (d, title) in zip(axes, (("image_to_text", "image->text R@5"), ("text_to_image", "text->image R@5"))):
        for name, per_dir in curves.items():
            pts = per_dir[d]
            epochs = [p["epoch"] for p in pts]
            style = dict(color="black", lw=2.2, zorder=5) if name == "baseline" else dict(lw=1.3)
            (line,) = ax.plot(epochs, [p["mean"] for p in pts], marker="o", ms=3, label=name, **style)
            if any(p["n"] > 1 for p in pts):
                ax.fill_between(epochs, [p["min"] for p in pts], [p["max"] for p in pts],
                                color=line.get_color(), alpha=0.12)
        ax.set(xlabel="epoch", title=f"Validation {title}")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("recall (%)")
    axes[1].legend(fontsize=7, ncol=2, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_study(out_dir: str | Path, study: dict) -> dict[str, Path]:
    """ablation.json, ablation.csv, ablation.md, ablation_recall.png, ablation_curves.png in DIR."""
    out_dir = Path(out_dir)
    paths = {"json": out_dir / "ablation.json", "csv": out_dir / "ablation.csv", "md": out_dir / "ablation.md",
             "recall": out_dir / "ablation_recall.png", "curves": out_dir / "ablation_curves.png"}
    paths["json"].write_text(json.dumps(study, indent=2) + "\n")
    write_csv(paths["csv"], study)
    write_markdown(paths["md"], study)
    plot_recall_deltas(paths["recall"], study)
    plot_recall_curves(paths["curves"], study)
    return paths
