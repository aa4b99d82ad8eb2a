"""clipft.objectives: the recipe losses against naive references written out here (explicit
negative sets, positives by image id, loops over rows), their gradients, and the Recipe's state
(seeded bank sample, the image queue)."""

import math

import pytest
import torch
import torch.nn.functional as F

from clipft.config import ConfigError
from clipft.loss import clip_loss
from clipft.objectives import ImageQueue, Recipe, parse_text_negatives, recipe_loss


def _unit(n, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)


def naive_infonce(img, txt, ids, scale, bank=None, bank_ids=None, queue=None, queue_ids=None):
    """Row by row: image b against [batch captions + bank], positives = captions of image b, loss =
    -log(sum of positive probabilities); caption c against [batch images + queue minus its own image's
    entries and empty slots], positives = the batch images with c's image id."""
    cols = [(txt[j], int(ids[j])) for j in range(len(ids))]
    if bank is not None:
        cols += [(bank[j], int(bank_ids[j])) for j in range(len(bank_ids))]
    i2t = []
    for b in range(len(ids)):
        s = torch.stack([scale * img[b] @ c for c, _ in cols])
        p = torch.softmax(s, 0)
        i2t.append(-torch.log(sum(p[j] for j, (_, i) in enumerate(cols) if i == int(ids[b]))))
    t2i = []
    for c in range(len(ids)):
        icols = [(img[j], int(ids[j]), True) for j in range(len(ids))]
        if queue is not None:
            icols += [(queue[j], int(queue_ids[j]), False) for j in range(len(queue_ids))
                      if int(queue_ids[j]) >= 0 and int(queue_ids[j]) != int(ids[c])]
        s = torch.stack([scale * txt[c] @ x for x, _, _ in icols])
        p = torch.softmax(s, 0)
        t2i.append(-torch.log(sum(p[j] for j, (_, i, inb) in enumerate(icols) if inb and i == int(ids[c]))))
    li, lt = torch.stack(i2t).mean(), torch.stack(t2i).mean()
    return 0.5 * (li + lt), li, lt


def naive_siglip(img, txt, ids, scale, bias, bank=None, bank_ids=None):
    cols = [(txt[j], int(ids[j])) for j in range(len(ids))]
    if bank is not None:
        cols += [(bank[j], int(bank_ids[j])) for j in range(len(bank_ids))]
    total = 0.0
    for b in range(len(ids)):
        for c, i in cols:
            z = 1.0 if i == int(ids[b]) else -1.0
            total = total - F.logsigmoid(z * (scale * img[b] @ c + bias))
    return total / len(ids)


def _grads(fn, img, scale, bias=None):
    img = img.clone().requires_grad_()
    scale = scale.clone().requires_grad_()
    leaves = [img, scale] + ([bias.clone().requires_grad_()] if bias is not None else [])
    loss = fn(*leaves)
    return loss.detach(), torch.autograd.grad(loss, leaves)


def _assert_same(fast, slow):
    (v1, g1), (v2, g2) = fast, slow
    assert torch.allclose(v1, v2, rtol=1e-9, atol=1e-10), (v1, v2)
    for a, b in zip(g1, g2):
        assert torch.allclose(a, b, rtol=1e-7, atol=1e-10)


def test_without_extras_it_is_clip_loss():
    img, txt = _unit(5, seed=1).float(), _unit(5, seed=2).float()
    scale = torch.tensor(7.0)
    a, b = recipe_loss(img, txt, scale), clip_loss(img, txt, scale)
    for k in b:
        assert torch.allclose(a[k], b[k], atol=1e-6)


CASES = {
    # ids of the batch rows; bank ids (None = no bank)
    "bank, multi-positive": ([0, 1, 2, 3], [5, 1, 1, 7, 2, 0, 9]),
    "bank smaller than the batch": ([0, 1, 2, 3, 4, 5], [3, 8]),
    "no bank": ([0, 1, 2, 3], None),
    "every bank caption a positive": ([0, 1, 2], [0, 1, 2, 2]),
}


@pytest.mark.parametrize("case", CASES)
def test_infonce_with_a_caption_bank_equals_the_naive_reference(case):
    ids, bank_ids = (torch.tensor(x) if x is not None else None for x in CASES[case])
    img, txt = _unit(len(ids), seed=3), _unit(len(ids), seed=4)
    bank = _unit(len(bank_ids), seed=5) if bank_ids is not None else None
    scale = torch.tensor(5.0, dtype=torch.float64)
    fast = _grads(lambda i, s: recipe_loss(i, txt, s, image_ids=ids, bank=bank, bank_ids=bank_ids)["loss"].double(),
                  img, scale)
    slow = _grads(lambda i, s: naive_infonce(i, txt, ids, s, bank, bank_ids)[0], img, scale)
    _assert_same(fast, slow)


def test_duplicate_captions_across_images_are_negatives_by_image_id():
    """Images 0 and 2 have the same caption text (identical embedding), also in the bank: positives
    are by image id, so each is a negative for the other image; value and gradient as the reference."""
    ids = torch.tensor([0, 1, 2])
    img, txt = _unit(3, seed=6), _unit(3, seed=7)
    txt[2] = txt[0]
    bank, bank_ids = torch.stack([txt[0], txt[0], _unit(1, seed=8)[0]]), torch.tensor([0, 2, 4])
    scale = torch.tensor(4.0, dtype=torch.float64)
    fast = _grads(lambda i, s: recipe_loss(i, txt, s, image_ids=ids, bank=bank, bank_ids=bank_ids)["loss"], img, scale)
    slow = _grads(lambda i, s: naive_infonce(i, txt, ids, s, bank, bank_ids)[0], img, scale)
    _assert_same(fast, slow)


def test_image_queue_equals_the_naive_reference():
    ids = torch.tensor([3, 4, 5, 6])
    img, txt = _unit(4, seed=9), _unit(4, seed=10)
    queue, queue_ids = _unit(6, seed=11), torch.tensor([0, 4, -1, 1, 6, 2])  # 4 and 6: own images; -1 empty
    scale = torch.tensor(6.0, dtype=torch.float64)
    fast = _grads(lambda i, s: recipe_loss(i, txt, s, image_ids=ids, queue=queue, queue_ids=queue_ids)["loss"],
                  img, scale)
    slow = _grads(lambda i, s: naive_infonce(i, txt, ids, s, queue=queue, queue_ids=queue_ids)[0], img, scale)
    _assert_same(fast, slow)
    # and combined with a bank
    bank, bank_ids = _unit(3, seed=12), torch.tensor([4, 9, 3])
    fast = _grads(lambda i, s: recipe_loss(i, txt, s, image_ids=ids, bank=bank, bank_ids=bank_ids, queue=queue,
                                           queue_ids=queue_ids)["loss"], img, scale)
    slow = _grads(lambda i, s: naive_infonce(i, txt, ids, s, bank, bank_ids, queue, queue_ids)[0], img, scale)
    _assert_same(fast, slow)


@pytest.mark.parametrize("case", CASES)
def test_siglip_equals_the_naive_reference(case):
    ids, bank_ids = (torch.tensor(x) if x is not None else None for x in CASES[case])
    img, txt = _unit(len(ids), seed=13), _unit(len(ids), seed=14)
    bank = _unit(len(bank_ids), seed=15) if bank_ids is not None else None
    scale, bias = torch.tensor(10.0, dtype=torch.float64), torch.tensor(-10.0, dtype=torch.float64)
    fast = _grads(lambda i, s, b: recipe_loss(i, txt, s, image_ids=ids, bank=bank, bank_ids=bank_ids, kind="siglip",
                                              logit_bias=b)["loss"], img, scale, bias)
    slow = _grads(lambda i, s, b: naive_siglip(i, txt, ids, s, b, bank, bank_ids), img, scale, bias)
    _assert_same(fast, slow)


def test_siglip_at_its_initialisation_is_about_the_positive_pair_cost():
    """t' = log 10, b = -10: with B images, each row costs ~ softplus(10 - 10 cos) for its positive
    and ~ B - 1 times log(1 + e^(-10)) for negatives: the loss starts near 7 per image, not at log B."""
    img, txt = _unit(8, seed=16).float(), _unit(8, seed=17).float()
    loss = recipe_loss(img, txt, torch.tensor(10.0), kind="siglip", logit_bias=torch.tensor(-10.0))["loss"]
    assert 5.0 < float(loss) < 15.0


def test_text_negatives_values():
    assert parse_text_negatives("batch") == 0 and parse_text_negatives("all") == -1
    assert parse_text_negatives("64") == 64 and parse_text_negatives(64) == 64
    for bad in ("0", "-3", "many", "1.5"):
        with pytest.raises(ConfigError, match="train.text_negatives"):
            parse_text_negatives(bad)


def test_bank_sample_is_seeded_by_seed_epoch_step_micro():
    bank, cap2img = _unit(50, seed=18).float(), torch.arange(50) // 5
    r = Recipe(negatives=7, bank=bank, cap2img=cap2img, seed=3)
    a, ai = r.bank_sample(1, 4, 0)
    b, bi = Recipe(negatives=7, bank=bank, cap2img=cap2img, seed=3).bank_sample(1, 4, 0)
    assert a.shape == (7, 6) and torch.equal(a, b) and torch.equal(ai, bi)
    assert not torch.equal(r.bank_sample(1, 5, 0)[1], ai) or not torch.equal(r.bank_sample(2, 4, 0)[1], ai)
    full, _ = Recipe(negatives=-1, bank=bank, cap2img=cap2img).bank_sample(0, 0, 0)
    assert full.shape == (50, 6)
    assert Recipe(negatives=500, bank=bank, cap2img=cap2img).bank_sample(0, 0, 0)[0].shape == (50, 6)  # N >= M: all


def test_queue_ring_buffer_and_a_non_finite_push():
    q = ImageQueue(5, 2, torch.device("cpu"))
    q.push(torch.ones(3, 2), torch.tensor([0, 1, 2]))
    q.push(2 * torch.ones(3, 2), torch.tensor([3, 4, 5]))  # wraps: slots 3, 4, 0
    assert q.ids.tolist() == [5, 1, 2, 3, 4] and q.ptr == 1
    bad = torch.full((2, 2), float("nan"))
    q.push(bad, torch.tensor([6, 7]))
    assert q.ids.tolist() == [5, 1, 2, 3, 4] and torch.isfinite(q.emb).all() and q.ptr == 3  # unchanged, never NaN
    state = q.state_dict()
    q2 = ImageQueue(5, 2, torch.device("cpu"))
    q2.load_state_dict(state)
    assert torch.equal(q2.emb, q.emb) and torch.equal(q2.ids, q.ids) and q2.ptr == q.ptr


def test_recipe_pushes_after_the_loss():
    """The batch is never its own queue negative: the loss with an empty queue is the in-batch loss."""
    img, txt = _unit(4, seed=19).float(), _unit(4, seed=20).float()
    r = Recipe(queue_size=8, dim=6)
    ids = torch.tensor([0, 1, 2, 3])
    first = r(img, txt, torch.tensor(5.0), image_ids=ids)
    assert torch.allclose(first["loss"], clip_loss(img, txt, torch.tensor(5.0))["loss"], atol=1e-6)
    assert sorted(r.queue.ids.tolist()) == [-1, -1, -1, -1, 0, 1, 2, 3]
    # Each caption's own image in the queue is excluded; the other 3 are negatives (again).
    second = r(img, txt, torch.tensor(5.0), image_ids=ids)
    assert torch.allclose(second["loss_i2t"], first["loss_i2t"]) and float(second["loss_t2i"]) > float(first["loss_t2i"])
    s = 5.0 * txt @ img.T  # [4, 4]
    want = (torch.logsumexp(torch.cat([s, s.masked_fill(torch.eye(4, dtype=torch.bool), -math.inf)], 1), 1)
            - s.diag()).mean()
    assert torch.allclose(second["loss_t2i"], want, atol=1e-5)


def test_chance_reference_of_the_health_check():
    bank, cap2img = _unit(50, seed=21).float(), torch.arange(50)
    assert Recipe(negatives=10, bank=bank, cap2img=cap2img).chance(8) == pytest.approx(0.5 * (math.log(18) + math.log(8)))
    assert Recipe(queue_size=24, dim=6).chance(8) == pytest.approx(0.5 * (math.log(8) + math.log(32)))
    assert Recipe(kind="siglip").chance(8) == 0.0  # no ln B reference: the "at chance" test is off


def test_a_bf16_bank_gives_the_fp32_loss_to_bf16_precision():
    """The bank is stored in the run's precision (bf16 halves its memory); the loss runs in fp32."""
    bank, cap2img = _unit(40, seed=22).float(), torch.arange(40) // 4
    img, txt = _unit(6, seed=23).float(), _unit(6, seed=24).float()
    ids = torch.tensor([0, 1, 2, 3, 4, 5])
    a = Recipe(negatives=-1, bank=bank, cap2img=cap2img)(img, txt, torch.tensor(10.0), image_ids=ids)
    r = Recipe(negatives=-1, bank=bank, cap2img=cap2img, dtype=torch.bfloat16)
    assert r.bank.dtype == torch.bfloat16
    b = r(img, txt, torch.tensor(10.0), image_ids=ids)
    assert b["loss"].dtype == torch.float32 and float(b["loss"]) == pytest.approx(float(a["loss"]), rel=2e-2)
