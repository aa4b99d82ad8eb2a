"""Multi-process training: the pure pieces (data sharding, single-process fallbacks, gradient
accumulation), then real 2-process gloo runs on the CPU (torch.multiprocessing.spawn, the same
environment variables torchrun sets):

* one optimizer step of 2 processes x per-rank batch == one step of 1 process x the concatenated batch
  (loss value, and the parameters after SGD, which expose the gradient and its scale), identical
  parameters on both ranks, gradient accumulation, and a NaN on one rank skipping the step on both;
* `clipft train` with 2 processes: an interrupted + resumed run equals an uninterrupted one, the
  sharded validation equals single-process evaluation of the checkpoint, only rank 0 writes.

BatchNorm: in train mode each rank normalises with its own batch statistics, which differ from the
statistics of the concatenated batch, so no exact equality can hold there (SyncBatchNorm would fix
it, but has no CPU kernel). The step-equality test therefore runs the tower with BN in eval mode
(BN = a fixed affine map: every other part of the step is exercised, gradients flow through BN's
weights); the end-to-end run uses train-mode BN and compares 2-process runs with each other.
"""

import contextlib
import io
import json
import math
import os
import signal
import socket
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch.utils.data import RandomSampler

from clipft import distributed
from clipft.config import ConfigError, ModelConfig
from clipft.distributed import (DistContext, all_gather_cat, all_gather_ints, all_gather_with_grad,
                                convert_to_sync_batchnorm, device_for_rank, micro_batches_per_epoch,
                                shard_train_indices)
from clipft.loss import clip_loss
from clipft.model import ImageTower
from clipft.train.loop import step_values, train_step

WORLD = 2


@pytest.fixture(autouse=True)
def one_thread():
    """These tests run many tiny convolutions; on a small shared machine one thread is several times
    faster than two competing ones (and the spawned ranks use one each)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# --------------------------------------------------------------------------- pure pieces

def test_world_of_one_keeps_the_single_process_order():
    for n, b in ((24, 8), (25, 8), (5, 8)):
        g = torch.Generator().manual_seed(3 * 100_003 + 2)
        expected = list(RandomSampler(range(n), generator=g))
        if n > b:
            expected = expected[: (n // b) * b]  # drop_last, as the single-process loader always did
        assert shard_train_indices(n, b, seed=3, epoch=2) == expected


def test_shards_are_slices_of_the_single_process_global_batches():
    n, b, world, seed = 50, 4, 3, 7
    single = shard_train_indices(n, b * world, seed, epoch=1)  # 1 process, batch 12
    shards = [shard_train_indices(n, b, seed, 1, rank=r, world_size=world) for r in range(world)]
    steps = micro_batches_per_epoch(n, b, world)
    assert steps == 4 and all(len(s) == steps * b for s in shards)  # equal batch counts on every rank
    for k in range(steps):
        gathered = [i for r in range(world) for i in shards[r][k * b:(k + 1) * b]]
        assert gathered == single[k * b * world:(k + 1) * b * world]
    flat = [i for s in shards for i in s]
    assert len(set(flat)) == len(flat)  # no image twice in an epoch
    # A function of (seed, epoch) only: same again, different next epoch.
    assert shard_train_indices(n, b, seed, 1, 1, world) == shards[1]
    assert shard_train_indices(n, b, seed, 2, 1, world) != shards[1]


def test_tiny_split_is_shared_out():
    shards = [shard_train_indices(5, 4, 0, 1, rank=r, world_size=2) for r in range(2)]
    assert [len(s) for s in shards] == [2, 3]
    assert sorted(shards[0] + shards[1]) == list(range(5))
    assert micro_batches_per_epoch(5, 4, 2) == 1


def test_single_process_fallbacks(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    ctx = distributed.setup("cpu")
    assert (ctx.rank, ctx.world_size, ctx.device.type, ctx.created, ctx.is_main) == (0, 1, "cpu", False, True)
    distributed.teardown(ctx)
    assert distributed.is_main() and distributed.get_world_size() == 1 and not distributed.is_distributed()
    x = torch.randn(3, 2, requires_grad=True)
    assert all_gather_with_grad(x) is x and all_gather_cat(x) is x
    assert all_gather_ints([4, 1]) == [[4, 1]]
    with distributed.main_process_first():
        pass
    # clip_loss(gather=True) without a process group is the plain loss.
    t = torch.nn.functional.normalize(torch.randn(3, 2), dim=-1)
    assert float(clip_loss(x.detach(), t, torch.tensor(2.0), gather=True)["loss"]) == \
        float(clip_loss(x.detach(), t, torch.tensor(2.0))["loss"])


def test_setup_errors(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(ConfigError, match="torchrun"):
        distributed.setup("cpu")
    with pytest.raises(ConfigError, match="LOCAL_RANK"):
        device_for_rank("cuda:1", 0)
    assert device_for_rank("cpu", 3).type == "cpu"
    if not torch.cuda.is_available():
        assert device_for_rank("auto", 1).type == "cpu"
        with pytest.raises(ConfigError, match="CUDA is not available"):
            device_for_rank("cuda", 0)


def _tower(seed=0, learnable=True):
    torch.manual_seed(seed)
    cfg = ModelConfig(backbone="resnet18", image_weights="none", head_hidden=16, learnable_temperature=learnable)
    return ImageTower(cfg, embed_dim=8)


def test_sync_batchnorm_option():
    model = _tower()
    single = DistContext(0, 1, 0, torch.device("cpu"), None, False)
    assert convert_to_sync_batchnorm(model, single, enabled=True) is model  # no-op alone
    multi_cpu = DistContext(0, 2, 0, torch.device("cpu"), "gloo", False)
    assert convert_to_sync_batchnorm(model, multi_cpu, enabled=False) is model
    with pytest.raises(ConfigError, match="needs CUDA"):
        convert_to_sync_batchnorm(model, multi_cpu, enabled=True)
    # What it does on CUDA: same parameters and state-dict keys, so checkpoints load into a plain tower.
    synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(_tower())
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in synced.modules())
    _tower(seed=1).load_state_dict(synced.state_dict())


def _batch(n, seed=0, size=16):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, size, size, generator=g)
    texts = torch.nn.functional.normalize(torch.randn(n, 8, generator=g), dim=-1)
    return images, texts


def _sgd(model, lr=0.5):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), torch.amp.GradScaler("cpu", enabled=False)


def _step(model, micro, grad_clip=0.0, gather=False):
    opt, sched, scaler = _sgd(model)
    return step_values(train_step(model, micro, opt, sched, scaler, None, grad_clip, gather=gather))


def test_gradient_accumulation_is_the_mean_of_micro_batch_gradients():
    images, texts = _batch(8)
    a, b = _tower().eval(), _tower().eval()  # eval: BN statistics independent of the batch split
    out = _step(a, [(images[:4], texts[:4]), (images[4:], texts[4:])])
    # Reference: one backward of the mean of the two micro-batch losses (in-batch negatives each).
    opt, sched, _ = _sgd(b)
    loss = 0.5 * sum(clip_loss(b(images[s]), texts[s], b.logit_scale.exp())["loss"] for s in (slice(0, 4), slice(4, 8)))
    loss.backward()
    opt.step()
    assert out["loss"] == pytest.approx(float(loss.detach()), rel=1e-5) and not out["skipped"]
    _assert_same_update(a.state_dict(), b.state_dict())
    # Not the same as one batch of 8: accumulation does not add negatives.
    full = float(clip_loss(b(images), texts, b.logit_scale.exp())["loss"].detach())
    assert abs(full - float(loss.detach())) > 1e-3


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler")  # the skipped step, on purpose
def test_nan_in_one_micro_batch_skips_the_whole_step():
    images, texts = _batch(8)
    model = _tower().eval()
    before = [p.detach().clone() for p in model.parameters()]
    bad = images[4:].clone()
    bad[0] = float("nan")
    out = _step(model, [(images[:4], texts[:4]), (bad, texts[4:])])
    assert out["skipped"] and math.isnan(out["loss"])
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert all(p.grad is None for p in model.parameters())  # the first micro-batch's gradient is dropped


# --------------------------------------------------------------------------- 2 processes

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _set_env(rank: int, port: int) -> None:
    # What torchrun sets for each worker.
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def _init_worker(rank: int, port: int) -> None:
    torch.set_num_threads(1)  # 2 processes on a small machine: no thread oversubscription
    _set_env(rank, port)
    # A desynchronised collective fails after a minute instead of hanging the suite for 30.
    distributed.PROCESS_GROUP_TIMEOUT = timedelta(seconds=90)


def _spawn(fn, *args):
    """Run fn(rank, *args) in WORLD fresh processes. forkserver: like spawn (a clean process, never a
    fork of pytest with its threads or CUDA state), but torch and clipft are imported once in the
    server, not in every worker of every test (seconds each on a small machine)."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torchvision", "clipft.train.loop", "clipft.cli.commands", "matplotlib.pyplot",
                                "transformers.models.auto", "transformers.models.clip.modeling_clip"])
    mp.start_processes(fn, args=args, nprocs=WORLD, join=True, start_method="forkserver")


def _step_worker(rank: int, port: int, out_dir: str) -> None:
    _init_worker(rank, port)
    ctx = distributed.setup("cpu")
    assert ctx.created and ctx.backend == "gloo" and ctx.world_size == WORLD
    images, texts = _batch(8)
    results = {}
    lo, hi = ((0, 5), (5, 8))[rank]  # uneven shards: 5 + 3 rows

    # 1. One step, global negatives: the loss of the concatenated batch and its gradient (SGD).
    model = distributed.wrap_model(_tower().eval(), ctx)
    results["loss_terms"] = {k: float(v.detach()) for k, v in clip_loss(
        model(images[lo:hi]), texts[lo:hi], distributed.unwrap(model).logit_scale.exp(), gather=True).items()}
    out = _step(model, [(images[lo:hi], texts[lo:hi])], gather=True)
    results["step"] = out
    results["params"] = {k: v.detach().clone() for k, v in distributed.unwrap(model).state_dict().items()}

    # 2. NaN on rank 1 only, local losses (gather=False): without the all-reduced verdict rank 0 would
    # back-propagate and wait forever in DDP's gradient all-reduce. Both must skip, then go on.
    before = {k: v.clone() for k, v in distributed.unwrap(model).state_dict().items()}
    bad = images[lo:hi].clone()
    if rank == 1:
        bad[0] = float("nan")
    results["nan_step"] = _step(model, [(bad, texts[lo:hi])], gather=False)
    results["unchanged_after_nan"] = all(torch.equal(v, before[k]) for k, v in
                                         distributed.unwrap(model).state_dict().items())
    results["after_nan"] = _step(model, [(images[lo:hi], texts[lo:hi])], gather=True)  # DDP still in sync

    # 3. Gradient accumulation, 2 micro-batches of 2 rows per rank (global micro-batches of 4).
    model = distributed.wrap_model(_tower().eval(), ctx)
    micro = [(images[4 * j + 2 * rank:4 * j + 2 * rank + 2], texts[4 * j + 2 * rank:4 * j + 2 * rank + 2])
             for j in range(2)]
    results["accum"] = _step(model, micro, gather=True)
    results["accum_params"] = {k: v.detach().clone() for k, v in distributed.unwrap(model).state_dict().items()}

    # 4. The training optimizer (fused AdamW on the CPU: a bad step is skipped on the device through
    # found_inf): a NaN on rank 1 skips the step on both ranks, then a step equals one process's.
    model = distributed.wrap_model(_tower().eval(), ctx)
    parts = _adamw(distributed.unwrap(model))
    before = {k: v.clone() for k, v in distributed.unwrap(model).state_dict().items()}
    results["adamw_nan"] = step_values(train_step(model, [(bad, texts[lo:hi])], *parts, None, 1.0, gather=True))
    results["adamw_unchanged"] = all(torch.equal(v, before[k]) for k, v in
                                     distributed.unwrap(model).state_dict().items())
    results["adamw"] = step_values(train_step(model, [(images[lo:hi], texts[lo:hi])], *parts, None, 1.0, gather=True))
    results["adamw_params"] = {k: v.detach().clone() for k, v in distributed.unwrap(model).state_dict().items()}
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    distributed.teardown(ctx)


def _adamw(model):
    from clipft.train.loop import build_optimizer
    opt = build_optimizer(model, 1e-3, 0.05)
    assert opt.defaults["fused"]
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), torch.amp.GradScaler("cpu", enabled=False)


def test_two_processes_step_equals_one_process_with_the_concatenated_batch(tmp_path):
    _spawn(_step_worker, _free_port(), str(tmp_path))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD))
    images, texts = _batch(8)

    # Single process, batch 8, same initial weights.
    ref = _tower().eval()
    ref_terms = clip_loss(ref(images), texts, ref.logit_scale.exp())
    ref_out = _step(ref, [(images, texts)])
    for r in (r0, r1):
        for k, v in ref_terms.items():  # identical loss values on every rank
            assert r["loss_terms"][k] == pytest.approx(float(v.detach()), rel=1e-5), k
        assert r["step"]["loss"] == pytest.approx(ref_out["loss"], rel=1e-5)
    # Parameters after one SGD step: p - lr * grad, so the update compares the gradients themselves
    # (their scale included: Adam's first step would hide a wrong factor). Ranks are bitwise identical.
    _assert_same_update(r0["params"], ref.state_dict())
    assert all(torch.equal(r0["params"][k], r1["params"][k]) for k in r0["params"])

    # NaN on one rank: both skipped, weights untouched, and the next step still ran on both.
    for r in (r0, r1):
        assert r["nan_step"]["skipped"] and r["unchanged_after_nan"] and not r["after_nan"]["skipped"]

    # Accumulation: 2 processes x 2 micro-batches of 2 == 1 process x 2 micro-batches of 4.
    ref = _tower().eval()
    ref_out = _step(ref, [(images[:4], texts[:4]), (images[4:], texts[4:])])
    assert r0["accum"]["loss"] == pytest.approx(ref_out["loss"], rel=1e-5)
    _assert_same_update(r0["accum_params"], ref.state_dict())
    assert all(torch.equal(r0["accum_params"][k], r1["accum_params"][k]) for k in r0["accum_params"])

    # AdamW under DDP: the NaN step skipped on both ranks (weights untouched), then == one process.
    ref = _tower().eval()
    ref_out = step_values(train_step(ref, [(images, texts)], *_adamw(ref), None, 1.0))
    for r in (r0, r1):
        assert r["adamw_nan"]["skipped"] and r["adamw_unchanged"] and not r["adamw"]["skipped"]
        assert r["adamw"]["loss"] == pytest.approx(ref_out["loss"], rel=1e-5)
    # (Adam's first step is ~lr x g/|g|: a weight whose gradient is ~eps amplifies float rounding, so
    # the update is compared per tensor, in norm.)
    _assert_same_update(r0["adamw_params"], ref.state_dict())
    assert all(torch.equal(r0["adamw_params"][k], r1["adamw_params"][k]) for k in r0["adamw_params"])


def _assert_same_update(after: dict, ref_after: dict) -> None:
    """Every parameter tensor moved, and by the reference's step to 1e-3 of that step's size."""
    before = _tower().state_dict()
    params = {n for n, p in _tower().named_parameters()}
    for k in params:
        step, ref_step = after[k] - before[k], ref_after[k] - before[k]
        assert ref_step.abs().max() > 0, k  # every parameter (logit_scale included: learnable) moved
        assert (step - ref_step).norm() <= 1e-3 * ref_step.norm(), k


def _train_args(text_dir):
    return ["--set", f"text.encoder={text_dir}", "--set", "train.epochs=2", "--set", "train.batch_size=4",
            "--set", "train.lr=1e-3", "--set", "train.warmup_steps=2", "--set", "model.backbone=resnet18",
            "--set", "model.image_weights=none", "--set", "model.head_hidden=32", "--set", "data.image_size=32",
            "--set", "data.num_workers=0", "--set", "train.device=cpu", "--set", "train.log_every=1", "--quiet"]


def _train_worker(rank: int, ports: list[int], data: str, text_dir: str, runs: str) -> None:
    """`clipft train` on 2 processes: run a uninterrupted; run b killed at the start of epoch 2 on
    every rank (as when a job is stopped), then rerun with the same command; run c checkpointed every
    2 steps and signalled on rank 0 alone mid-epoch, then rerun."""
    from clipft.train import loop as train_mod
    from clipft.cli.commands import main

    _init_worker(rank, ports[0])
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        codes = _train_runs(main, train_mod, ports, data, text_dir, runs)
    Path(runs, f"codes{rank}.json").write_text(json.dumps(codes))
    Path(runs, f"stdout{rank}.txt").write_text(stdout.getvalue())


def _train_runs(main, train_mod, ports, data, text_dir, runs) -> dict:
    codes = {"a": main(["train", "--data", data, "--out", f"{runs}/a", *_train_args(text_dir)])}
    real = train_mod.make_train_loader

    def crash_at_epoch_2(ds, cfg, epoch, device):
        if epoch == 2:
            raise KeyboardInterrupt
        return real(ds, cfg, epoch, device)
    os.environ["MASTER_PORT"] = str(ports[1])  # a fresh rendezvous per launch, as torchrun would
    with train_mod.use_hooks(make_loader=crash_at_epoch_2):
        codes["b_killed"] = main(["train", "--data", data, "--out", f"{runs}/b", *_train_args(text_dir)])
    os.environ["MASTER_PORT"] = str(ports[2])
    codes["b_resumed"] = main(["train", "--data", data, "--out", f"{runs}/b", "--quiet"])
    # Run c: train.checkpoint_every=2 steps, and SIGTERM reaching rank 0 alone during step 4 (epoch 2,
    # step 1): the ranks agree in their step-boundary all-gather, both save at step 2 and step 4 and
    # stop with 143; the rerun resumes mid-epoch.
    real_step, calls = train_mod.train_step, []

    def sigterm_to_rank_0_at_step_4(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4 and os.environ["RANK"] == "0":
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(*args, **kwargs)
    os.environ["MASTER_PORT"] = str(ports[3])
    with train_mod.use_hooks(step=sigterm_to_rank_0_at_step_4):
        codes["c_signalled"] = main(["train", "--data", data, "--out", f"{runs}/c", *_train_args(text_dir),
                                     "--set", "train.checkpoint_every=2"])
    saved = torch.load(f"{runs}/c/last.pt", weights_only=False)
    codes["c_saved"] = [saved["step"], saved["epoch"], saved["epoch_steps"], len(calls)]
    os.environ["MASTER_PORT"] = str(ports[4])
    codes["c_resumed"] = main(["train", "--data", data, "--out", f"{runs}/c", "--quiet"])
    return codes


def test_two_process_training_resumes_exactly_and_validates_like_one_process(coco_root, tiny_clip_dir, tmp_path):
    from clipft.config import from_dict
    from clipft.data import load_split
    from clipft.eval.evaluate import embed_images, evaluate_split
    from clipft.model import load_image_tower
    from clipft.data import text_cache_path
    from clipft.text import get_text_embeddings
    from clipft.train.rundir import read_records

    _spawn(_train_worker, [_free_port() for _ in range(5)], str(coco_root), str(tiny_clip_dir), str(tmp_path))
    for r in range(WORLD):
        assert json.loads((tmp_path / f"codes{r}.json").read_text()) == {
            "a": 0, "b_killed": 130, "b_resumed": 0, "c_signalled": 143, "c_saved": [4, 1, 1, 4], "c_resumed": 0}
    # `done: ...` from rank 0 only, once per finished job (a, b resumed, c resumed).
    assert [(tmp_path / f"stdout{r}.txt").read_text().count("done:") for r in range(WORLD)] == [3, 0]

    a, b = tmp_path / "a", tmp_path / "b"
    ca, cb = (torch.load(d / "last.pt", weights_only=False) for d in (a, b))
    assert ca["epoch"] == cb["epoch"] == 2 and ca["step"] == 2 * 3  # 24 images / (2 x 4) = 3 steps per epoch
    assert ca["world_size"] == 2 and len(ca["rng_per_rank"]) == 2
    assert not torch.equal(ca["rng_per_rank"][0]["torch"], ca["rng_per_rank"][1]["torch"])  # own streams
    # Killed + resumed == uninterrupted: weights, optimizer moments, logs.
    assert all(torch.equal(ca["model"][k], cb["model"][k]) for k in ca["model"])
    cc = torch.load(tmp_path / "c" / "last.pt", weights_only=False)  # signalled mid-epoch + resumed
    assert all(torch.equal(ca["model"][k], cc["model"][k]) for k in ca["model"])
    assert [r["step"] for r in read_records(tmp_path / "c" / "metrics.jsonl", "step")] == list(range(1, 7))
    ma, mb = ca["optimizer"]["state"], cb["optimizer"]["state"]
    assert all(torch.equal(ma[i]["exp_avg"], mb[i]["exp_avg"]) for i in ma)
    ea, eb = (read_records(d / "metrics.jsonl", "epoch") for d in (a, b))
    assert [r["epoch"] for r in ea] == [r["epoch"] for r in eb] == [1, 2]  # rank 0 alone writes: no duplicates
    assert [r["train_loss"] for r in ea] == pytest.approx([r["train_loss"] for r in eb], rel=1e-6)
    assert len(read_records(a / "metrics.jsonl", "step")) == 6
    summary = json.loads((a / "summary.json").read_text())
    assert summary["distributed"] == {"processes": 2, "backend": "gloo", "batch_per_process": 4, "global_batch": 8,
                                      "grad_accum_steps": 1, "images_per_step": 8, "sync_batchnorm": False,
                                      "embed_chunk": 0}

    # Validation: 2 ranks each embedded half of the images; the gathered metrics equal a
    # single-process evaluation of the saved weights (val loss in global batches of 8).
    cfg = from_dict(ca["config"])
    tower = load_image_tower(a / "last.pt")
    val = load_split(coco_root, "val", cfg.data)
    text, _ = get_text_embeddings(val.captions, cfg.text.encoder, text_cache_path(coco_root / "cache", "val",
                                                                                  cfg.text.encoder))
    emb, rows = embed_images(tower, val, cfg, torch.device("cpu"))
    single = evaluate_split(emb, rows, val, text, cfg.eval.ks, logit_scale=tower.logit_scale.exp().item(), batch_size=8)
    logged = ea[-1]["val"]
    assert logged["num_images"] == single["num_images"] == 12
    for d in ("image_to_text", "text_to_image"):
        assert logged[d] == single[d]
    assert logged["val_loss"] == pytest.approx(single["val_loss"], rel=1e-4)


def test_unwrap_sees_through_torch_compile():
    # train.compile=true wraps the (DDP) model in torch.compile's OptimizedModule; train_step and
    # checkpoints reach the ImageTower through `unwrap`. torch.compile is lazy: nothing compiles here.
    from clipft import distributed
    m = torch.nn.Linear(2, 2)
    assert distributed.unwrap(torch.compile(m)) is m
    assert distributed.unwrap(m) is m


# --------------------------------------------------------------------------- a backbone frozen for an epoch

FREEZE_ARGS = ["--set", "train.freeze_backbone_epochs=1", "--set", "model.learnable_temperature=true",
               # BatchNorm on running statistics: per-rank batch statistics would differ from the
               # concatenated batch's (module docstring), everything else must be equal.
               "--set", "model.freeze_bn_stats=true", "--set", "train.checkpoint_every=0"]


def _freeze_worker(rank: int, port: int, data: str, text_dir: str, runs: str) -> None:
    from clipft.cli.commands import main

    _init_worker(rank, port)
    code = main(["train", "--data", data, "--out", f"{runs}/ddp", *_train_args(text_dir), *FREEZE_ARGS])
    Path(runs, f"freeze{rank}.json").write_text(json.dumps(code))


def test_two_processes_with_a_frozen_backbone_and_learnable_temperature_equal_one_process(
        coco_root, tiny_clip_dir, tmp_path, monkeypatch):
    """train.freeze_backbone_epochs > 0 makes DDP look for unused parameters; the logit scale must
    then come out of the model's forward, or DDP marks it unused and fails when its gradient arrives
    ("Expected to mark a variable ready only once"). 2 processes x batch 4 through the real `train`
    (AdamW, the unfreeze warm-up, both epochs) == 1 process x batch 8."""
    from clipft.cli.commands import main

    _spawn(_freeze_worker, _free_port(), str(coco_root), str(tiny_clip_dir), str(tmp_path))
    assert [json.loads((tmp_path / f"freeze{r}.json").read_text()) for r in range(WORLD)] == [0, 0]
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    args = [a if a != "train.batch_size=4" else "train.batch_size=8" for a in _train_args(str(tiny_clip_dir))]
    assert main(["train", "--data", str(coco_root), "--out", str(tmp_path / "one"), *args, *FREEZE_ARGS]) == 0
    ddp, one = (torch.load(tmp_path / d / "last.pt", weights_only=False) for d in ("ddp", "one"))
    assert ddp["step"] == one["step"] == 6 and ddp["epoch"] == one["epoch"] == 2
    start = _tower().state_dict()  # (only its keys)
    for k in start:
        if ddp["model"][k].is_floating_point():
            torch.testing.assert_close(ddp["model"][k], one["model"][k], rtol=1e-3, atol=1e-5, msg=k)
    assert not torch.equal(ddp["model"]["logit_scale"], torch.tensor(math.log(1 / 0.07)))  # it learned
