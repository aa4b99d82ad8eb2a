"""data.datasets: each image's caption per epoch is a pure function of (seed, epoch, image)."""

from clipft.data.datasets import epoch_caption_index


def test_epoch_caption_index_is_deterministic_and_in_range():
    offsets = [0, 5, 8, 9]  # 3 images with 5, 3 and 1 captions
    picks = [[epoch_caption_index(offsets, 0, e, i) for i in range(3)] for e in range(20)]
    assert picks == [[epoch_caption_index(offsets, 0, e, i) for i in range(3)] for e in range(20)]
    assert all(0 <= p[0] < 5 and 5 <= p[1] < 8 and p[2] == 8 for p in picks)
    assert len({p[0] for p in picks}) > 1  # the caption changes across epochs
