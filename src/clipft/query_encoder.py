"""Queries in other languages: a query encoder used instead of the frozen text encoder for text queries.

A model's images live in its frozen text encoder's output space. Another text encoder can embed the
queries only if it maps into that same space (a multilingual student distilled onto the frozen
encoder's embeddings, for example), which nothing about the encoder shows by itself. So it is
accepted only when
  - it gives embeddings of the model's dimension (else refused: a different space for certain), and
  - it is the frozen encoder itself (same fingerprint), or its folder declares the space:
    QUERY_ENCODER_FILE = {"output_space": "<the frozen encoder's fingerprint>", ...}
    (`declare_query_encoder` writes it; the fingerprint is config.json's text_encoder.fingerprint).

The model's fingerprint stays the frozen encoder's: an index built with the model keeps serving, and
only the text queries go through the query encoder. Images and image queries are unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .model import ModelError

QUERY_ENCODER_FILE = "clipft_query_encoder.json"


class _QueryText:
    """Stands in for inference._TextSide: encodes with the query encoder, keeps the frozen fingerprint."""

    def __init__(self, frozen: Any, encoder: Any, name: str):
        self.frozen, self._encoder, self.name = frozen, encoder, name
        self.max_length, self.device, self.embed_dim = encoder.max_length, frozen.device, frozen.embed_dim

    def encoder(self):
        return self._encoder

    def fingerprint(self) -> str:
        return self.frozen.fingerprint()


def read_declaration(name: str) -> dict | None:
    """The QUERY_ENCODER_FILE of a local encoder folder, or None (hub names and undeclared folders)."""
    path = Path(name).expanduser() / QUERY_ENCODER_FILE
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ModelError(f"{path}: not a readable JSON file ({type(e).__name__})") from None
    if not isinstance(value, dict) or not isinstance(value.get("output_space"), str):
        raise ModelError(f"{path}: expected a JSON object with an \"output_space\" fingerprint")
    return value


def use_query_encoder(model: Any, name: str) -> Any:
    """Make `model` (an inference.ImageTextModel) encode text queries with `name` (hub name or folder);
    ModelError (one line) when its dimension differs or it does not declare the model's text space."""
    from .text.encoder import text_fingerprint
    from .text import TextEncoderError, load_text_encoder
    frozen = model._text
    try:
        # In the frozen side's precision (fp32 unless load(..., amp=) said otherwise), like its encoder.
        enc = load_text_encoder(str(name), device=model.device, max_length=int(getattr(frozen, "max_length", 77)),
                                amp=getattr(frozen, "amp", "off"))
    except TextEncoderError as e:
        raise ModelError(f"query encoder {name!r}: {e}") from None
    if enc.dim != model.embed_dim:
        raise ModelError(f"query encoder {name!r} gives {enc.dim}-d embeddings, the model {model.embed_dim}-d: "
                         "not the model's text space")
    space = frozen.fingerprint()
    if text_fingerprint(enc) != space:
        decl = read_declaration(str(name))
        if decl is None:
            raise ModelError(f"query encoder {name!r}: does not declare this model's text space; if it was trained "
                             f"into it, put {QUERY_ENCODER_FILE} with {{\"output_space\": \"{space}\"}} in its folder")
        if decl["output_space"] != space:
            raise ModelError(f"query encoder {name!r}: {QUERY_ENCODER_FILE} declares output space "
                             f"{decl['output_space'][:12]}..., this model's text encoder is {space[:12]}...")
    model._text = _QueryText(frozen, enc, str(name))
    return model


def declare_query_encoder(encoder_dir: str | Path, model: Any, note: str = "") -> Path:
    """Write QUERY_ENCODER_FILE into `encoder_dir`: it maps into `model`'s (an ImageTextModel, as
    `clipft.load` gives) frozen text space. The caller vouches for that (e.g. a distilled student)."""
    if not hasattr(model, "fingerprint"):
        raise TypeError("declare_query_encoder: pass the loaded model, clipft.load(PATH)")
    path = Path(encoder_dir) / QUERY_ENCODER_FILE
    path.write_text(json.dumps({"output_space": model._text.fingerprint(), "output_dim": model.embed_dim,
                                "text_encoder": model.text_encoder_name, "note": note}, indent=2) + "\n")
    return path
