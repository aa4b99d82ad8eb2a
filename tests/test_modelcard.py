"""clipft.modelcard: the export folder's README.md is built from the run's own files."""

import shutil

from clipft.cli.commands import main
from clipft.export import export_checkpoint
from clipft.modelcard import _public_source, dataset_id


def test_card_reports_evaluate_and_zeroshot_results_of_this_checkpoint(trained_run, coco_root, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    ckpt = str(run / "best.pt")
    assert main(["evaluate", "--checkpoint", ckpt, "--data", str(coco_root), "--quiet"]) == 0
    assert main(["zeroshot", "--checkpoint", ckpt, "--data", str(coco_root), "--labels-from", "shapes:shape",
                 "--quiet"]) == 0
    export_checkpoint(ckpt, tmp_path / "out")
    card = (tmp_path / "out" / "README.md").read_text()
    assert "### `val`\n\nProtocol: full validation split (as during training): 12 images" in card  # the evaluate output, with its protocol line
    assert "| `val` | " in card and "Not measured" not in card  # the zero-shot table
    assert str(coco_root) not in card  # no local data paths in a card meant for publishing
    assert "datasets:\n- clipft-synthetic-shapes" in card


def test_public_source_and_dataset_id():
    assert _public_source("coco:/home/me/data/coco2014:val:subset=8,seed=0") == "coco:coco2014:val:subset=8,seed=0"
    assert _public_source("train2014") == "train2014"
    assert _public_source("val split: 8 images (csv:/d/x/pets.csv:val)") == "val split: 8 images (csv:pets.csv:val)"
    summary = {"dataset": {"source": "coco:/x/coco:train"}, "data_root": "/nonexistent/coco"}
    assert dataset_id({"data": {"format": "auto"}}, summary) == "coco"
    assert dataset_id({"data": {"format": "csv"}}, {"data_root": "/d/pets.csv"}) == "pets"
