"""clipft: teach an image encoder to speak the language of a frozen CLIP text encoder.

Stages, one module each: config, data (+ shapes), text, model, loss, train, evaluate, visualize,
report, cli. The library never parses argv; `clipft.cli` does.

Use a trained model: `clipft.load(DIR)` (see clipft.api); write your own loop on
`clipft.CaptionDataset` (see clipft.dataset). Both are imported on first use, so `import clipft`
stays light.
"""

__version__ = "0.1.0"

# name -> module that defines it, imported on first attribute access (PEP 562).
_LAZY = {"load": "api", "ImageTextModel": "api", "similarity": "api", "CaptionDataset": "dataset"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value  # later lookups skip __getattr__
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_LAZY))
