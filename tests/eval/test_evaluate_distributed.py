"""`clipft evaluate` under torchrun: 2 processes (gloo, the environment torchrun sets) share out the
image embedding, rank 0 scores Recall@K once over all of it and alone writes files; the figures and
the embeddings equal a single-process evaluation, on a COCO folder and on webdataset shards."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from clipft.cli.commands import main


def _evaluate_worker(rank: int, ports: list[int], runs: dict, args: dict, out: str) -> None:
    """Each rank runs the same `clipft evaluate` line per data source, recording which files it
    writes (metrics and embeddings) and what it prints."""
    import contextlib
    import io

    from test_distributed import _init_worker
    from clipft.eval import evaluate as ev
    _init_worker(rank, ports[0])
    written: list[str] = []
    real_write, real_save = ev.write_metrics, ev.save_split_embeddings
    ev.write_metrics = lambda path, m: (written.append(str(path)), real_write(path, m))[1]
    ev.save_split_embeddings = lambda path, *a, **k: (written.append(str(path)), real_save(path, *a, **k))[1]
    codes, stdout = {}, io.StringIO()
    for i, (name, run) in enumerate(runs.items()):
        os.environ["MASTER_PORT"] = str(ports[i])
        with contextlib.redirect_stdout(stdout):
            codes[name] = main(["evaluate", "--checkpoint", f"{run}/best.pt", *args[name], "--save-embeddings",
                                "auto", "--quiet"])
    Path(out, f"rank{rank}.json").write_text(json.dumps({"codes": codes, "written": written,
                                                         "stdout": stdout.getvalue()}))


@pytest.fixture(scope="module")
def eval_shards(coco_root, tmp_path_factory):
    """coco_root as shards of 10: train-000000..000002.tar, val-000000..000001.tar."""
    out = tmp_path_factory.mktemp("eval-shards") / "sh"
    assert main(["shard", str(coco_root), "--out", str(out), "--shard-size", "10", "--quiet"]) == 0
    return out


def test_two_process_evaluate_equals_one_process_on_folders_and_shards(trained_run, coco_root, eval_shards,
                                                                       tmp_path):
    from test_distributed import WORLD, _free_port, _spawn
    from clipft.eval.evaluate import load_split_embeddings
    args = {"coco": ["--data", str(coco_root)],
            "shards": ["--data", f"{eval_shards}/train-{{000000..000002}}.tar",
                       "--set", f"data.val_path={eval_shards}/val-{{000000..000001}}.tar"]}
    runs = {}
    for name in ("coco", "shards", "coco_single", "shards_single"):  # pristine copies: outputs land beside best.pt
        runs[name] = tmp_path / name
        runs[name].mkdir()
        shutil.copy(trained_run / "best.pt", runs[name] / "best.pt")
    for name in ("coco", "shards"):  # single process first: it builds the caches the 2-process runs read
        assert main(["evaluate", "--checkpoint", str(runs[f"{name}_single"] / "best.pt"), *args[name],
                     "--save-embeddings", "auto", "--quiet"]) == 0
    _spawn(_evaluate_worker, [_free_port() for _ in range(2)], {k: str(runs[k]) for k in ("coco", "shards")},
           args, str(tmp_path))

    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    assert [g["codes"] for g in got] == [{"coco": 0, "shards": 0}] * WORLD
    assert got[1]["written"] == [] and got[1]["stdout"] == ""  # rank 1 embeds its half, writes and says nothing
    assert sorted(Path(p).name for p in got[0]["written"]) == sorted(
        ["embeddings_val.safetensors", "metrics_val.json", "metrics.json"] * 2)
    assert got[0]["stdout"].count("image_to_text") == 2
    for name in ("coco", "shards"):
        two = json.loads((runs[name] / "metrics_val.json").read_text())
        one = json.loads((runs[f"{name}_single"] / "metrics_val.json").read_text())
        assert two["num_images"] == one["num_images"] == 12
        for d in ("image_to_text", "text_to_image"):
            assert two[d] == one[d]
        (e2, _), (e1, _) = (load_split_embeddings(r / "embeddings_val.safetensors")
                            for r in (runs[name], runs[f"{name}_single"]))
        assert torch.equal(e2["image_ids"], e1["image_ids"]) and torch.equal(e2["caption_ids"], e1["caption_ids"])
        assert torch.allclose(e2["image_emb"], e1["image_emb"], atol=1e-5)
        assert torch.equal(e2["text_emb"], e1["text_emb"])
