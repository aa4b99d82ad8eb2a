"""clipft: teach an image encoder to speak the language of a frozen CLIP text encoder.

The library (what a user imports): `config`, `model` (the image tower), `loss`, `text` (the frozen
text encoder and its caption cache), `preprocess`, `inference` (`clipft.load`: use a trained model),
`export` + `modelcard`, `embed`, `search/`, `data/` (one module per dataset format behind one
registry) and `report/`. Its tools: `train/` (training runs), `eval/` (evaluation, zero-shot,
pictures) and `cli/` (the only place that parses argv). A loaded model imports nothing of `train/`,
`eval/` or `cli/`.

`clipft.load(DIR)` and `clipft.CaptionDataset` are imported on first use, so `import clipft` stays light.
"""

__version__ = "0.1.0"

from ._compat import install_moved_module_aliases  # noqa: E402

install_moved_module_aliases()

# name -> module that defines it, imported on first attribute access (PEP 562).
_LAZY = {"load": "inference", "ImageTextModel": "inference", "similarity": "inference",
         "CaptionDataset": "data.caption_dataset"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value  # later lookups skip __getattr__
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_LAZY))
