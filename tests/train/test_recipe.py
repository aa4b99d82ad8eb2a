"""The recipe levers through the training step and the trainer: the caption bank, the image queue and
SigLIP under chunking (== unchunked), under 2 gloo processes (== one process on the concatenated
batch), the clustered batch sampler, EMA checkpoints, and an exact mid-epoch resume with all of them.

Towers run with BatchNorm in eval mode (a fixed affine map) where exact equality with another batch
split is asserted: train-mode BatchNorm statistics depend on the split (tests/test_distributed.py)."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from clipft import distributed
from clipft.config import ModelConfig
from clipft.model import ImageTower
from clipft.objectives import SIGLIP_INIT_BIAS, SIGLIP_INIT_SCALE, Recipe
from clipft.train import clustered
from clipft.train.step import step_values, train_step

IDS = torch.arange(10, 18)  # the 8 batch rows' image ids
BANK_IDS = torch.tensor([10, 11, 3, 4, 15, 20, 21, 15, 30, 31, 17, 2])  # 12 captions, 5 of batch images


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _tower(siglip=False):
    torch.manual_seed(0)
    cfg = ModelConfig(backbone="resnet18", image_weights="none", head_hidden=16, learnable_temperature=True)
    model = ImageTower(cfg, embed_dim=8)
    if siglip:
        with torch.no_grad():
            model.logit_scale.fill_(math.log(SIGLIP_INIT_SCALE))
        model.add_logit_bias(SIGLIP_INIT_BIAS)
    return model.eval()


def _batch(n=8, seed=0, size=16):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, size, size, generator=g)
    return images, F.normalize(torch.randn(n, 8, generator=g), dim=-1)


def _recipe(kind: str, tower) -> Recipe:
    bank = F.normalize(torch.randn(len(BANK_IDS), 8, generator=torch.Generator().manual_seed(5)), dim=-1)
    if kind == "bank":
        return Recipe(negatives=5, bank=bank, cap2img=BANK_IDS, seed=1, tower=tower)
    if kind == "queue":
        r = Recipe(queue_size=6, dim=8, tower=tower)
        r.queue.push(F.normalize(torch.randn(5, 8, generator=torch.Generator().manual_seed(6)), dim=-1),
                     torch.tensor([0, 12, 1, 16, 2]))  # 12 and 16: images of this batch (excluded for them)
        return r
    assert kind == "siglip"
    return Recipe(negatives=-1, bank=bank, cap2img=BANK_IDS, kind="siglip", tower=tower)


def _sgd(model):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), torch.amp.GradScaler("cpu", enabled=False)


def _micro(images, texts, ids, parts=1, epoch=1, step=0):
    n = images.shape[0] // parts
    return [(images[j * n:(j + 1) * n], texts[j * n:(j + 1) * n],
             {"image_ids": ids[j * n:(j + 1) * n], "epoch": epoch, "step": step, "micro": j}) for j in range(parts)]


def _params(model):
    return {n: p.detach().clone() for n, p in distributed.unwrap(model).named_parameters()}


def _assert_close(got: dict, want: dict):
    assert got.keys() == want.keys()
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-6, msg=n)


KINDS = ("bank", "queue", "siglip")


@pytest.mark.parametrize("kind", KINDS)
def test_chunked_step_equals_the_unchunked_step(kind):
    images, texts = _batch()
    runs = []
    for chunk in (0, 3):
        model = _tower(kind == "siglip")
        recipe = _recipe(kind, model)
        out = step_values(train_step(model, _micro(images, texts, IDS), *_sgd(model), None, 0.0, loss_fn=recipe,
                                     embed_chunk=chunk))
        runs.append((out, _params(model), recipe))
    (a, pa, ra), (b, pb, rb) = runs
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and not a["skipped"]
    _assert_close(pb, pa)
    assert not torch.equal(pa["logit_scale"], _params(_tower(kind == "siglip"))["logit_scale"])  # it trained
    if kind == "siglip":
        assert float(pa["logit_bias"]) != SIGLIP_INIT_BIAS  # the bias learns, chunked or not
    if kind == "queue":
        torch.testing.assert_close(rb.queue.emb, ra.queue.emb) and torch.equal(rb.queue.ids, ra.queue.ids)


def test_a_non_finite_batch_skips_the_step_and_stays_out_of_the_queue():
    images, texts = _batch()
    model = _tower()
    recipe = _recipe("queue", model)
    before, ids_before = _params(model), recipe.queue.ids.clone()
    images[2] = float("nan")
    out = step_values(train_step(model, _micro(images, texts, IDS), *_sgd(model), None, 1.0, loss_fn=recipe))
    assert out["skipped"] and all(torch.equal(v, before[k]) for k, v in _params(model).items())
    assert torch.isfinite(recipe.queue.emb).all() and torch.equal(recipe.queue.ids, ids_before)


# --------------------------------------------------------------------------- 2 processes

def _recipe_worker(rank: int, port: int, out_dir: str) -> None:
    from test_distributed import _init_worker
    _init_worker(rank, port)
    ctx = distributed.setup("cpu")
    images, texts = _batch()
    lo, hi = ((0, 5), (5, 8))[rank]  # uneven shards
    result = {}
    for kind in KINDS:
        model = distributed.wrap_model(_tower(kind == "siglip"), ctx)
        recipe = _recipe(kind, distributed.unwrap(model))
        result[kind] = step_values(train_step(model, _micro(images[lo:hi], texts[lo:hi], IDS[lo:hi]), *_sgd(model),
                                              None, 0.0, gather=True, loss_fn=recipe))
        result[kind + "_params"] = _params(model)
        if recipe.queue is not None:
            result[kind + "_queue"] = (recipe.queue.emb.clone(), recipe.queue.ids.clone())
    # The bank with accumulation (2 micro-batches of 2 per rank) and chunks of 1.
    model = distributed.wrap_model(_tower(), ctx)
    recipe = _recipe("bank", distributed.unwrap(model))
    micro = [(images[4 * j + 2 * rank:4 * j + 2 * rank + 2], texts[4 * j + 2 * rank:4 * j + 2 * rank + 2],
              {"image_ids": IDS[4 * j + 2 * rank:4 * j + 2 * rank + 2], "epoch": 1, "step": 0, "micro": j})
             for j in range(2)]
    result["accum"] = step_values(train_step(model, micro, *_sgd(model), None, 0.0, gather=True, loss_fn=recipe,
                                             embed_chunk=1))
    result["accum_params"] = _params(model)
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    distributed.teardown(ctx)


def test_two_processes_equal_one_process_with_the_concatenated_batch(tmp_path):
    from test_distributed import WORLD, _free_port, _spawn
    _spawn(_recipe_worker, _free_port(), str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    images, texts = _batch()
    for kind in KINDS:
        ref = _tower(kind == "siglip")
        recipe = _recipe(kind, ref)
        want = step_values(train_step(ref, _micro(images, texts, IDS), *_sgd(ref), None, 0.0, loss_fn=recipe))
        for r in ranks:
            assert r[kind]["loss"] == pytest.approx(want["loss"], rel=1e-5), kind
            _assert_close(r[kind + "_params"], _params(ref))
            if recipe.queue is not None:  # every rank holds the same queue: the global batch, in order
                torch.testing.assert_close(r[kind + "_queue"][0], recipe.queue.emb)
                assert torch.equal(r[kind + "_queue"][1], recipe.queue.ids)
        assert all(torch.equal(ranks[0][kind + "_params"][n], ranks[1][kind + "_params"][n])
                   for n in ranks[0][kind + "_params"])
    ref = _tower()
    want = step_values(train_step(ref, _micro(images, texts, IDS, parts=2), *_sgd(ref), None, 0.0,
                                  loss_fn=_recipe("bank", ref)))
    for r in ranks:
        assert r["accum"]["loss"] == pytest.approx(want["loss"], rel=1e-5)
        _assert_close(r["accum_params"], _params(ref))


# --------------------------------------------------------------------------- clustered batches

def test_clustered_batches_are_seeded_disjoint_across_ranks_and_clustered():
    g = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(4, 16, generator=g), dim=-1)
    # 64 images in 4 tight groups, 2 captions each, interleaved
    caps = F.normalize(centres[torch.arange(128) // 2 % 4] + 0.05 * torch.randn(128, 16, generator=g), dim=-1)
    offsets = torch.arange(0, 129, 2)
    assign = clustered.load_or_build_clusters(caps, offsets, global_batch=16, seed=3, text_cache=None)
    truth = torch.arange(64) % 4
    for c in range(4):  # k = 64 // 16 = 4 clusters, found exactly
        assert len(set(assign[truth == c].tolist())) == 1
    shards = [clustered.shard_clustered_indices(assign, 8, seed=3, epoch=1, rank=r, world_size=2) for r in range(2)]
    assert all(len(s) == 32 for s in shards)
    flat = shards[0] + shards[1]
    assert sorted(flat) == list(range(64))  # every image once, on one rank
    for k in range(4):  # each global batch (rank 0's slice + rank 1's) is one cluster
        batch = shards[0][8 * k:8 * k + 8] + shards[1][8 * k:8 * k + 8]
        assert len(set(assign[batch].tolist())) == 1
    assert clustered.shard_clustered_indices(assign, 8, 3, 1, 0, 2) == shards[0]
    assert clustered.shard_clustered_indices(assign, 8, 3, 2, 0, 2) != shards[0]


def test_clusters_are_cached_beside_the_text_cache(tmp_path):
    caps = F.normalize(torch.randn(40, 8, generator=torch.Generator().manual_seed(1)), dim=-1)
    offsets = torch.arange(0, 41, 2)
    cache = tmp_path / "train-text.pt"
    a = clustered.load_or_build_clusters(caps, offsets, 5, seed=0, text_cache=cache)
    assert clustered.cluster_file(cache, 4, 0).is_file()
    assert torch.equal(clustered.load_or_build_clusters(caps, offsets, 5, seed=0, text_cache=cache), a)


# --------------------------------------------------------------------------- the trainer

RECIPES = {
    "bank+queue+ema+clustered": ("--set", "train.text_negatives=16", "--set", "train.image_queue=12",
                                 "--set", "train.ema=0.9", "--set", "data.batch_sampler=clustered"),
    "siglip+all+chunked": ("--set", "train.loss=siglip", "--set", "train.text_negatives=all", "--set", "train.ema=0.5",
                           "--set", "train.embed_chunk=3"),
}


@pytest.mark.parametrize("name", RECIPES)
def test_resume_mid_epoch_is_exact(name, coco_root, tiny_clip_dir, tmp_path):
    from clipft.cli.commands import main
    from clipft.model import load_image_tower
    from clipft.train import loop as train_mod
    from train.test_loop import small_args
    extra = RECIPES[name]
    full, killed = tmp_path / "full", tmp_path / "killed"
    assert main(["train", "--data", str(coco_root), "--out", str(full), *small_args(tiny_clip_dir, 2, extra)]) == 0
    real, calls = train_mod.train_step, []

    def killed_at_step_5(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*args, **kwargs)
    with train_mod.use_hooks(step=killed_at_step_5):
        assert main(["train", "--data", str(coco_root), "--out", str(killed),
                     *small_args(tiny_clip_dir, 2, extra + ("--set", "train.checkpoint_every=2"))]) == 130
    saved = torch.load(killed / "last.pt", weights_only=False)
    assert (saved["step"], saved["epoch_steps"]) == (4, 1)  # mid-epoch 2
    assert main(["train", "--data", str(coco_root), "--out", str(killed), "--quiet"]) == 0
    a = torch.load(full / "last.pt", weights_only=False)
    b = torch.load(killed / "last.pt", weights_only=False)
    for key in ("model", "train_model"):  # EMA weights and raw weights
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    if "recipe" in a and a["recipe"]:
        assert torch.equal(a["recipe"]["queue"]["emb"], b["recipe"]["queue"]["emb"])
    # EMA: checkpoints hold both; "model" (what export and clipft.load read) is the average.
    assert a["ema"]["updates"] == 6 and any(not torch.equal(a["model"][k], a["train_model"][k]) for k in a["model"])
    best = torch.load(full / "best.pt", weights_only=False)
    loaded = load_image_tower(full / "best.pt").state_dict()
    assert all(torch.equal(loaded[k], best["model"][k]) for k in loaded)
    if name.startswith("siglip"):
        assert "logit_bias" in loaded and float(a["train_model"]["logit_bias"]) != SIGLIP_INIT_BIAS


def test_the_default_recipe_builds_no_recipe():
    from clipft.config import Config
    from clipft.train.loop import build_recipe
    assert build_recipe(Config(), None, None, None) is None  # the default step path: loss.clip_loss as before
