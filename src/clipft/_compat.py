"""Old import paths of modules that moved into `train/`, `eval/` and `cli/`, kept for one release.

`import clipft.api` (now `clipft.inference`) still works and warns once with a DeprecationWarning
naming the new path. The old name is a thin module that exposes the new module's names; patching it
does not patch the new module.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

# old dotted path -> new dotted path (modules that existed in clipft 0.1's flat layout).
MOVED = {f"clipft.{old}": f"clipft.{new}" for old, new in {
    "api": "inference", "dataset": "data.caption_dataset",
    "step": "train.step", "chunked": "train.chunked", "checkpoint": "train.checkpoint",
    "resume": "train.resume", "preempt": "train.preempt", "runfiles": "train.rundir",
    "runlog": "train.commandlog", "runlock": "train.lock", "tblog": "train.tensorboard",
    "health": "train.health", "traindata": "train.data_setup",
    "evaluate": "eval.evaluate", "protocols": "eval.protocols", "zeroshot": "eval.zeroshot",
    "baseline": "eval.clip_baseline", "pictures": "eval.pictures", "visualize": "eval.plots",
    "cli_args": "cli.args", "cli_models": "cli.model_commands", "demo": "cli.demo", "ablate": "cli.ablate",
}.items()}


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname in MOVED:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        return None  # a plain module; exec_module fills it

    def exec_module(self, module) -> None:
        new = MOVED[module.__name__]
        warnings.warn(f"{module.__name__} has moved to {new}; the old path goes away in the next release",
                      DeprecationWarning, stacklevel=2)
        target = importlib.import_module(new)
        module.__dict__.update({k: v for k, v in vars(target).items() if not k.startswith("__")})
        module.__getattr__ = lambda name: getattr(target, name)  # names the new module gains later


def install_moved_module_aliases() -> None:
    if not any(isinstance(f, _MovedModuleFinder) for f in sys.meta_path):
        sys.meta_path.append(_MovedModuleFinder())
