"""clipft.eval.metrics: the tiled float32 rank counting equals an all-float64 naive reference exactly,
including exact ties, near-ties inside the float32 error band, multiple positives and captionless images."""
import pytest
import torch
import torch.nn.functional as F

from clipft.eval.metrics import TIE_ATOL, retrieval_ranks, retrieval_recall


def naive_ranks(img, txt, t2i):
    """Float64 [N, M] matrix, every comparison written out (the definition in retrieval_ranks)."""
    s = img.double() @ txt.double().T
    n, m = s.shape
    pos = s[t2i, torch.arange(m)]
    image_rank = torch.zeros(n, dtype=torch.long)
    for i in range(n):
        own = t2i == i
        if not own.any():
            continue
        best = s[i, own].max()
        image_rank[i] = int((s[i, ~own] >= best - TIE_ATOL).sum())
    text_rank = torch.zeros(m, dtype=torch.long)
    for j in range(m):
        others = torch.arange(n) != t2i[j]
        text_rank[j] = int((s[others, j] >= pos[j] - TIE_ATOL).sum())
    return image_rank, text_rank


def clustered(n, per, d, noise, seed):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, d, generator=g), dim=-1)
    t2i = torch.arange(n).repeat_interleave(per)
    txt = F.normalize(img[t2i] + noise * torch.randn(len(t2i), d, generator=g), dim=-1)
    return img, txt, t2i


@pytest.mark.parametrize("chunk,col", [(None, 8192), (7, 13), (1, 1)])
def test_tiled_ranks_equal_float64_reference(chunk, col):
    img, txt, t2i = clustered(40, 3, 16, 1.0, 0)
    got = retrieval_ranks(img, txt, t2i, chunk_size=chunk, col_chunk=col)
    ref = naive_ranks(img, txt, t2i)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


def test_exact_ties_and_near_ties_are_decided_in_float64():
    img, txt, t2i = clustered(30, 2, 32, 0.5, 1)
    img[5] = img[6]  # identical images: tied scores for every caption
    img[7] = img[8].clone()
    # Near-ties far below float32 resolution of the scores but above TIE_ATOL: the float32 tile
    # cannot tell them apart, float64 can.
    img[9] = F.normalize(img[10].double() + 3e-8 * torch.randn(32, dtype=torch.float64), dim=-1).float()
    txt[0] = txt[1]  # duplicate captions of one image
    txt[4] = F.normalize(txt[12].double() + 1e-8, dim=-1).float()
    t2i = t2i.clone()
    t2i[-2:] = 3  # an image with 4 captions; image 29 keeps none
    got = retrieval_ranks(img, txt, t2i, chunk_size=4, col_chunk=5)
    ref = naive_ranks(img, txt, t2i)
    queries = torch.bincount(t2i, minlength=30) > 0  # image 29 owns no caption: it is no query
    assert not queries[29]
    assert torch.equal(got[0][queries], ref[0][queries]) and torch.equal(got[1], ref[1])


def test_collapsed_tower_is_never_better_than_chance():
    img = torch.ones(20, 8) / 8 ** 0.5
    t2i = torch.arange(20).repeat_interleave(2)
    txt = F.normalize(torch.randn(40, 8, generator=torch.Generator().manual_seed(2)), dim=-1)
    ranks = retrieval_ranks(img, txt, t2i, chunk_size=3, col_chunk=7)
    assert torch.equal(ranks[0], naive_ranks(img, txt, t2i)[0])
    assert retrieval_recall(img, txt, t2i)["text_to_image"]["R@10"] == 0.0


def test_unnormalised_and_float64_inputs():
    img, txt, t2i = clustered(25, 2, 8, 2.0, 3)
    img = img * 3.0
    got = retrieval_ranks(img.double(), txt * 0.5, t2i, chunk_size=6, col_chunk=9)
    ref = naive_ranks(img, txt * 0.5, t2i)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


@pytest.mark.parametrize("choice", ["one", "all", "alternate"])
def test_counting_on_one_thread_or_all_gives_the_same_exact_ranks(monkeypatch, choice):
    # On a CPU with several threads, retrieval_ranks times a counting pass on one thread and on all
    # every RETIME_TILES tiles and counts on the faster: whichever it picks, tile by tile, the ranks
    # are the float64 ones (exact ties, near-ties inside the float32 band included).
    from clipft.eval import metrics
    img, txt, t2i = clustered(30, 2, 32, 0.5, 4)
    img[5] = img[6]
    img[9] = F.normalize(img[10].double() + 3e-8 * torch.randn(32, dtype=torch.float64), dim=-1).float()
    txt[0] = txt[1]
    picks = iter([True, False] * 1000)
    calls = []

    def pick(*args):
        calls.append(torch.get_num_threads())
        return {"one": True, "all": False}.get(choice) if choice != "alternate" else next(picks)
    monkeypatch.setattr(metrics, "_one_thread_is_faster", pick)
    monkeypatch.setattr(metrics, "RETIME_TILES", 1)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        got = retrieval_ranks(img, txt, t2i, chunk_size=4, col_chunk=5)
        assert torch.get_num_threads() == 2  # restored after counting on one thread
    finally:
        torch.set_num_threads(threads)
    ref = naive_ranks(img, txt, t2i)
    assert len(calls) == 8 * 12 and set(calls) == {2}  # every tile decided (RETIME_TILES=1), from all threads
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


def test_the_timing_probe_leaves_the_thread_count_alone():
    from clipft.eval.metrics import _one_thread_is_faster
    threads = torch.get_num_threads()
    s = torch.randn(64, 128)
    assert _one_thread_is_faster(s, torch.empty(s.numel()), torch.zeros(64, 1), 2) in (True, False)
    assert torch.get_num_threads() == threads


def test_finite_check_is_exact_when_a_sum_overflows():
    from clipft.eval.metrics import EvaluationError, check_finite
    big = torch.full((4, 8), 3e38)  # every value finite, their float32 sum is inf
    check_finite(big, big)  # not refused
    bad = big.clone()
    bad[2, 3] = float("nan")
    with pytest.raises(EvaluationError, match="1 of 4 image embeddings and 0 of 4 text"):
        check_finite(bad, big)
