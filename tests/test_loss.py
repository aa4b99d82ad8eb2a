import math

import pytest
import torch
import torch.nn.functional as F

from clipft.loss import chance_loss, clip_loss


def naive_loss(img, txt, scale):
    # Row by row softmax cross-entropy, both directions, written out.
    b = img.shape[0]
    s = scale * img @ txt.T
    li = -sum(torch.log_softmax(s[i], 0)[i] for i in range(b)) / b
    lt = -sum(torch.log_softmax(s[:, j], 0)[j] for j in range(b)) / b
    return (li + lt) / 2


def test_matches_naive():
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(6, 8, generator=g), dim=-1)
    txt = F.normalize(torch.randn(6, 8, generator=g), dim=-1)
    out = clip_loss(img, txt, torch.tensor(1 / 0.07))
    assert set(out) == {"loss", "loss_i2t", "loss_t2i"}
    assert float(out["loss"]) == pytest.approx(float(naive_loss(img, txt, 1 / 0.07)), rel=1e-5)


def test_chance_and_perfect():
    b = 8
    same = F.normalize(torch.ones(b, 4), dim=-1)
    # Every pair scores the same: loss is exactly ln(B).
    assert float(clip_loss(same, same, torch.tensor(10.0))["loss"]) == pytest.approx(math.log(b))
    assert chance_loss(b) == pytest.approx(math.log(b))
    eye = torch.eye(b)
    assert float(clip_loss(eye, eye, torch.tensor(100.0))["loss"]) < 1e-6


def test_asymmetric_terms_differ_and_gradients_flow():
    g = torch.Generator().manual_seed(1)
    img = F.normalize(torch.randn(5, 3, generator=g), dim=-1).requires_grad_()
    txt = F.normalize(torch.randn(5, 3, generator=g), dim=-1)
    scale = torch.tensor(2.0, requires_grad=True)
    out = clip_loss(img, txt, scale)
    assert float(out["loss_i2t"].detach()) != pytest.approx(float(out["loss_t2i"].detach()))
    out["loss"].backward()
    assert img.grad is not None and scale.grad is not None


def test_shape_mismatch():
    with pytest.raises(ValueError):
        clip_loss(torch.zeros(3, 4), torch.zeros(2, 4), torch.tensor(1.0))
