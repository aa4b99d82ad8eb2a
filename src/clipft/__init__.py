"""clipft: teach an image encoder to speak the language of a frozen CLIP text encoder.

Stages, one module each: config, data (+ shapes), text, model, loss, train, evaluate, visualize,
report, cli. The library never parses argv; `clipft.cli` does.
"""

__version__ = "0.1.0"
