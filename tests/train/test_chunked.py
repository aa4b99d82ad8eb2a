"""chunked.chunked_clip_backward: the full-batch contrastive gradient with the image tower run in chunks.

Compared against references computed with the whole graph in memory, the whole batch in ONE forward
pass (never the same chunks):
* BatchNorm: a chunked step runs every BatchNorm on its running statistics, so the chunked gradient
  is the unchunked step's gradient with BatchNorm in eval mode, logit scale included, to float
  tolerance: for the default tower (train-mode backbone BatchNorm), a BatchNorm head (the
  `batchnorm` ablation preset) and a LayerNorm head, each from a tower in train mode;
* head dropout: the same dropout draws as a reference that embeds the same chunks in the same order
  WITH a graph (dropout masks are drawn per forward call), and the RNG stream left where that
  reference leaves it;
* 2 gloo processes (global negatives, uneven shards, DDP; and `train_step` with accumulation): the
  same gradient and update as one process with the concatenated batch and no chunking.
"""

import math
from pathlib import Path

import pytest
import torch

from clipft import distributed
from clipft.train.chunked import chunked_clip_backward
from clipft.config import ModelConfig
from clipft.loss import clip_loss
from clipft.model import ImageTower
from clipft.train.step import step_values, train_step


def _tower(seed=0, dropout=0.0, head_norm="none"):
    torch.manual_seed(seed)
    cfg = ModelConfig(backbone="resnet18", image_weights="none", head_hidden=16, learnable_temperature=True,
                      head_dropout=dropout, head_norm=head_norm)
    return ImageTower(cfg, embed_dim=8)


def _batch(n=8, seed=0, size=16):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, size, size, generator=g)
    return images, torch.nn.functional.normalize(torch.randn(n, 8, generator=g), dim=-1)


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _chunked(model, images, texts, chunk, objective=lambda loss: loss, **kw):
    terms, emb, scale = chunked_clip_backward(model, images, texts, chunk, objective, **kw)
    assert float(scale) == pytest.approx(float(distributed.unwrap(model).logit_scale.detach().exp()))
    return terms, emb


def _assert_close_grads(got: dict, want: dict, rtol=1e-4, atol=1e-6):
    assert got.keys() == want.keys() and "logit_scale" in got  # every parameter, the temperature too
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=rtol, atol=atol, msg=n)


@pytest.mark.parametrize("chunk", [1, 3, 8])  # 3: an uneven last chunk; 8: one chunk
def test_equals_the_unchunked_gradient_with_batchnorm_in_eval_mode(chunk):
    images, texts = _batch()
    ref = _tower().eval()
    loss = clip_loss(ref(images), texts, ref.logit_scale.exp())["loss"]
    loss.backward()
    loss = loss.detach()
    model = _tower().eval()
    terms, emb = _chunked(model, images, texts, chunk)
    assert float(terms["loss"]) == pytest.approx(float(loss), rel=1e-5)
    assert set(terms) == {"loss", "loss_i2t", "loss_t2i"} and not terms["loss"].requires_grad
    assert emb.shape == (8, 8) and emb.dtype == torch.float32 and not emb.requires_grad
    _assert_close_grads(_grads(model), _grads(ref))


def test_objective_scales_the_gradient_and_accumulates():
    """objective = what the step back-propagates (1/K, the GradScaler's scale): linear in the gradient;
    a second call adds to .grad like a second backward (gradient accumulation)."""
    images, texts = _batch()
    a, b = _tower().eval(), _tower().eval()
    _chunked(a, images, texts, 3)
    _chunked(b, images, texts, 3, objective=lambda loss: 0.25 * loss)
    _chunked(b, images, texts, 5, objective=lambda loss: 0.75 * loss)
    _assert_close_grads(_grads(b), _grads(a))


def _eval_batchnorm(model):
    """The reference's tower: BatchNorm on running statistics, everything else as it is."""
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()
    return model


@pytest.mark.parametrize("head_norm", ["none", "batchnorm", "layernorm"])  # default; the ablation presets
@pytest.mark.parametrize("chunk", [1, 3])  # 3: an uneven last chunk
def test_train_mode_tower_equals_the_unchunked_gradient_with_running_statistics(head_norm, chunk):
    """A tower in train mode (backbone BatchNorm on batch statistics, as by default): the chunked
    gradient is that of ONE unchunked forward with every BatchNorm on its running statistics; the
    BatchNorm layers are back in train mode afterwards and their statistics unchanged. (Before,
    each chunk was normalised with its own statistics: another loss, gradient cosine 0.02-0.41.)"""
    images, texts = _batch(10)
    ref = _eval_batchnorm(_tower(head_norm=head_norm).train())
    clip_loss(ref(images), texts, ref.logit_scale.exp())["loss"].backward()
    model = _tower(head_norm=head_norm).train()
    before = {n: b.clone() for n, b in model.named_buffers()}
    terms, _ = _chunked(model, images, texts, chunk)
    _assert_close_grads(_grads(model), _grads(ref), atol=1e-5)  # summed over 10 chunks: float rounding
    assert all(m.training for m in model.modules())
    assert all(torch.equal(b, before[n]) for n, b in model.named_buffers())
    # The check bites: the unchunked train-mode gradient (batch statistics) is another one.
    plain = _tower(head_norm=head_norm).train()
    clip_loss(plain(images), texts, plain.logit_scale.exp())["loss"].backward()
    got, other = _grads(model), _grads(plain)
    assert any(not torch.allclose(got[n], other[n], rtol=1e-3, atol=1e-6) for n in other)


def test_dropout_replays_the_first_pass():
    images, texts = _batch(10)
    chunk = 4  # 4 + 4 + 2
    # Reference: the same chunks (dropout masks are drawn per forward call), in the same order, each
    # embedded once WITH its graph; BatchNorm on running statistics as in every chunked step.
    ref = _eval_batchnorm(_tower(dropout=0.3).train())
    torch.manual_seed(123)
    emb = torch.cat([ref(images[s:s + chunk]) for s in range(0, 10, chunk)])
    clip_loss(emb, texts, ref.logit_scale.exp())["loss"].backward()
    ref_next = torch.rand(3)  # where the RNG stream is after the reference
    model = _tower(dropout=0.3).train()
    torch.manual_seed(123)
    _, got_emb = _chunked(model, images, texts, chunk)
    assert torch.equal(torch.rand(3), ref_next)
    torch.testing.assert_close(got_emb, emb.detach())  # the same dropout masks
    _assert_close_grads(_grads(model), _grads(ref))


def test_without_replayed_randomness_the_gradient_would_differ():
    """The check above can fail: a replay that draws fresh dropout masks gives another gradient."""
    images, texts = _batch(10)
    ref = _eval_batchnorm(_tower(dropout=0.3).train())
    torch.manual_seed(123)
    emb = torch.cat([ref(images[s:s + 4]) for s in range(0, 10, 4)])
    clip_loss(emb, texts, ref.logit_scale.exp())["loss"].backward()
    model = _tower(dropout=0.3).train()
    torch.manual_seed(124)
    _chunked(model, images, texts, 4)
    got, want = _grads(model), _grads(ref)
    assert any(not torch.allclose(got[n], want[n], rtol=1e-3, atol=1e-6) for n in want)


def test_fixed_temperature_and_bf16_autocast():
    # 32 px: at 16 px ResNet18's layer4 sees 1x1 maps, where oneDNN's bf16 stride-2 convolution has
    # returned garbage weight gradients at random (PyTorch 2.14, CPU); 32 px and up are stable.
    images, texts = _batch(size=32)
    torch.manual_seed(0)
    model = ImageTower(ModelConfig(backbone="resnet18", image_weights="none", head_hidden=16), embed_dim=8).eval()
    assert not model.logit_scale.requires_grad
    ref = ImageTower(ModelConfig(backbone="resnet18", image_weights="none", head_hidden=16), embed_dim=8).eval()
    ref.load_state_dict(model.state_dict())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        emb = ref(images)
    clip_loss(emb, texts, ref.logit_scale.exp())["loss"].backward()
    terms, emb_c = _chunked(model, images, texts, 4, amp_dtype=torch.bfloat16)
    assert emb_c.dtype == torch.float32 and terms["loss"].dtype == torch.float32  # loss stays fp32
    assert model.logit_scale.grad is None
    got, want = _grads(model), _grads(ref)
    for n in want:  # bf16 chunks of 4 vs one batch of 8: the same math, rounded differently
        cos = torch.nn.functional.cosine_similarity(got[n].flatten(), want[n].flatten(), dim=0)
        assert cos > 0.999, n


def test_non_finite_loss_poisons_every_gradient():
    """The NaN guard's objective (loss x NaN) reaches every parameter through the replays."""
    images, texts = _batch()
    images[5] = float("inf")
    model = _tower().eval()
    terms, _ = _chunked(model, images, texts, 3,
                        objective=lambda loss: loss * torch.where(torch.isfinite(loss), 1.0, float("nan")))
    assert not math.isfinite(float(terms["loss"]))
    assert all(not torch.isfinite(g).all() for g in _grads(model).values())


def test_out_of_memory_advice_and_detection():
    from clipft.train.chunked import out_of_memory_advice
    from clipft.runtime import is_out_of_memory
    assert "--set train.embed_chunk=64 " in out_of_memory_advice(1024, 0)
    assert "--set train.embed_chunk=16 " in out_of_memory_advice(32, 0)
    assert "--set train.embed_chunk=32 " in out_of_memory_advice(1024, 64)
    assert "lower data.image_size" in out_of_memory_advice(1024, 2)
    assert "running statistics" in out_of_memory_advice(1024, 0)  # what chunking does to BatchNorm, said
    # A BatchNorm head cannot be chunked (config.validate): never suggested for it.
    head_bn = out_of_memory_advice(1024, 0, head_norm="batchnorm")
    assert "embed_chunk=" not in head_bn and "model.head_norm=layernorm" in head_bn
    with pytest.raises(RuntimeError) as real:
        torch.empty(2**45, dtype=torch.uint8)  # the CPU allocator's own error
    assert is_out_of_memory(real.value) and is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))
    assert not is_out_of_memory(RuntimeError("shape mismatch")) and not is_out_of_memory(ValueError("memory"))


def test_chunk_must_be_positive():
    images, texts = _batch(4)
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        _chunked(_tower().eval(), images, texts, 0)


# --------------------------------------------------------------------------- 2 processes

def _chunked_worker(rank: int, port: int, out_dir: str) -> None:
    from test_distributed import _init_worker  # the torchrun environment, 1 thread, a short timeout

    _init_worker(rank, port)
    ctx = distributed.setup("cpu")
    images, texts = _batch(8)
    lo, hi = ((0, 5), (5, 8))[rank]  # uneven shards: 3 chunks of <= 2 on rank 0, 2 on rank 1
    model = distributed.wrap_model(_tower().eval(), ctx)
    tower = distributed.unwrap(model)
    terms, _, _ = chunked_clip_backward(model, images[lo:hi], texts[lo:hi], 2, lambda loss: loss, gather=True)
    result = {"loss": float(terms["loss"]), "grads": _grads(tower)}
    # Through train_step (train.embed_chunk=2), 2 accumulated micro-batches per rank, SGD.
    model = distributed.wrap_model(_tower().eval(), ctx)
    micro = [(images[4 * j + 2 * rank:4 * j + 2 * rank + 2], texts[4 * j + 2 * rank:4 * j + 2 * rank + 2])
             for j in range(2)]
    result["step"] = step_values(train_step(model, micro, *_sgd(model), None, 0.0, gather=True, embed_chunk=1))
    result["params"] = {n: p.detach().clone() for n, p in distributed.unwrap(model).named_parameters()}
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    distributed.teardown(ctx)


def _sgd(model):
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), torch.amp.GradScaler("cpu", enabled=False)


def test_two_processes_chunked_equal_one_process_unchunked(tmp_path):
    """DDP averages rank gradients that the global loss scaled by the world size (loss docstring):
    the result is the gradient of one process's unchunked loss on the concatenated batch."""
    from test_distributed import WORLD, _free_port, _spawn
    _spawn(_chunked_worker, _free_port(), str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    images, texts = _batch(8)
    ref = _tower().eval()
    loss = clip_loss(ref(images), texts, ref.logit_scale.exp())["loss"]
    loss.backward()
    loss = loss.detach()
    for r in ranks:
        assert r["loss"] == pytest.approx(float(loss), rel=1e-5)
        _assert_close_grads(r["grads"], _grads(ref))
    assert all(torch.equal(ranks[0]["grads"][n], ranks[1]["grads"][n]) for n in ranks[0]["grads"])
    # train_step, chunks of 1 under DDP with accumulation == 1 process, 2 micro-batches of 4, unchunked.
    ref = _tower().eval()
    want = step_values(train_step(ref, [(images[:4], texts[:4]), (images[4:], texts[4:])], *_sgd(ref), None, 0.0))
    for r in ranks:
        assert r["step"]["loss"] == pytest.approx(want["loss"], rel=1e-5) and not r["step"]["skipped"]
        for n, p in ref.named_parameters():
            torch.testing.assert_close(r["params"][n], p.detach(), rtol=1e-4, atol=1e-6, msg=n)


def test_chunking_a_batchnorm_head_is_refused_in_one_line():
    from clipft.config import ConfigError, load_config
    with pytest.raises(ConfigError, match="model.head_norm=batchnorm") as e:
        load_config(overrides=["train.embed_chunk=32", "model.head_norm=batchnorm"])
    assert "\n" not in str(e.value) and "train.embed_chunk=0" in str(e.value)
    load_config(overrides=["train.embed_chunk=32", "model.head_norm=layernorm"])
    load_config(overrides=["train.embed_chunk=0", "model.head_norm=batchnorm"])
    load_config(overrides=["train.embed_chunk=128", "train.batch_size=128", "model.head_norm=batchnorm"])  # no chunks
