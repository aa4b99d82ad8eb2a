"""Training runs: the tools that turn data and cached captions into a trained image tower.

`loop` holds the epoch loop (`train`), `step` the one-update training step, `chunked` the chunked
contrastive backward; the run directory (`rundir`, `commandlog`, `lock`, `tensorboard`), checkpoints
(`checkpoint`, `resume`, `preempt`), `health` and the data set-up (`data_setup`) serve them.
Nothing here is imported by a loaded model (`clipft.inference`).
"""

from .errors import TrainingError

__all__ = ["TrainingError", "train"]


def __getattr__(name: str):
    # `from clipft.train import train` without importing the loop (and torch) on `import clipft.train`.
    if name == "train":
        from .loop import train
        return train
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
