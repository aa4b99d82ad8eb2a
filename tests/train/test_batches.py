"""clipft.train.batches: one optimizer step's micro-batches, the same on every rank."""
import torch

from clipft.train.batches import micro_batch_groups


def test_micro_batch_groups():
    def batch(n, skipped=0):  # (images [n,...], texts [n, D], index, n_skipped) like collate_train
        return torch.zeros(n, 3, 2, 2), torch.zeros(n, 4), torch.arange(n), skipped
    loader = [batch(4), batch(1, skipped=3), batch(4), batch(3, skipped=1), batch(4)]
    counts = {"skipped_images": 0, "images": 0, "batch": 0}
    groups = list(micro_batch_groups(loader, 2, counts))
    # The 1-image batch is left out (no negatives); groups of 2, the last one shorter.
    assert [[mb[0].shape[0] for mb in g] for g in groups] == [[4, 4], [3, 4]]
    assert counts == {"skipped_images": 4, "images": 15, "batch": 4}
