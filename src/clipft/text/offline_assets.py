"""A CLIP text tower without network access, for tests, benchmarks and the baseline's tokenizer:
`write_clip_tokenizer_files` (OpenAI's BPE vocab, converted from the file open_clip ships, to the
Hugging Face format with OpenAI's exact token ids) and `save_random_clip_text_model`.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path
from typing import Any

import torch

from .encoder import (CLIP_BOS, CLIP_BOS_ID, CLIP_EOS, CLIP_EOS_ID, CLIP_NUM_MERGES, CLIP_VOCAB_SIZE, TextEncoderError, _first_line, _quiet_transformers)


def _bytes_to_unicode() -> dict[int, str]:
    """OpenAI's reversible byte -> printable unicode map (GPT-2 / CLIP BPE); order defines token ids 0..255."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def default_bpe_path() -> Path:
    """open_clip's copy of OpenAI's `bpe_simple_vocab_16e6.txt.gz` (found without importing open_clip)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or spec.origin is None:
        raise TextEncoderError("the CLIP BPE vocab comes from the open_clip_torch package, which is not "
                               "installed (pip install open_clip_torch), or pass bpe_path")
    path = Path(spec.origin).parent / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise TextEncoderError(f"{path}: not found in the installed open_clip package")
    return path


def write_clip_tokenizer_files(out_dir: Path, bpe_path: Path | None = None) -> Path:
    """Write a Hugging Face CLIP tokenizer (vocab.json, merges.txt, tokenizer.json, tokenizer_config.json,
    special_tokens_map.json) into `out_dir`, converted from OpenAI's BPE file with OpenAI's exact ids:
    256 byte tokens, the same with '</w>', then one token per merge, then <|startoftext|>, <|endoftext|>."""
    out_dir = Path(out_dir)
    bpe_path = Path(bpe_path) if bpe_path is not None else default_bpe_path()
    try:
        lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    except (OSError, UnicodeDecodeError, EOFError) as e:
        raise TextEncoderError(f"{bpe_path}: not a gzipped CLIP BPE merges file ({_first_line(e)})") from None
    merges = lines[1:CLIP_NUM_MERGES + 1]  # line 0 is a version header
    if len(merges) != CLIP_NUM_MERGES or any(len(m.split()) != 2 for m in merges):
        raise TextEncoderError(f"{bpe_path}: expected {CLIP_NUM_MERGES} merge lines of two symbols each")
    byte_tokens = list(_bytes_to_unicode().values())
    vocab = (byte_tokens + [t + "</w>" for t in byte_tokens] + ["".join(m.split()) for m in merges]
             + [CLIP_BOS, CLIP_EOS])
    if len(vocab) != CLIP_VOCAB_SIZE or len(set(vocab)) != CLIP_VOCAB_SIZE:
        raise TextEncoderError(f"{bpe_path}: converted vocab has {len(set(vocab))} distinct tokens, "
                               f"expected {CLIP_VOCAB_SIZE}")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False),
                                        encoding="utf-8")
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    specials = {"bos_token": CLIP_BOS, "eos_token": CLIP_EOS, "unk_token": CLIP_EOS, "pad_token": CLIP_EOS}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")
    (out_dir / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, **specials}, indent=2) + "\n")
    # Round-trip through transformers so tokenizer.json (the fast tokenizer) exists as well.
    from transformers import AutoTokenizer
    with _quiet_transformers():
        tok = AutoTokenizer.from_pretrained(str(out_dir))
        tok.save_pretrained(str(out_dir))
    ids = tok("a photo of a cat")["input_ids"]
    if ids != [CLIP_BOS_ID, 320, 1125, 539, 320, 2368, CLIP_EOS_ID]:  # OpenAI CLIP's ids for this text
        raise TextEncoderError(f"{out_dir}: converted CLIP tokenizer gives wrong ids {ids}")
    return out_dir


def save_random_clip_text_model(out_dir: Path, hidden_size: int = 32, num_layers: int = 2, heads: int = 2,
                                projection_dim: int = 16, seed: int = 0, **overrides: Any) -> Path:
    """Save a randomly initialised CLIPTextModelWithProjection plus OpenAI's tokenizer into `out_dir`,
    loadable offline with `load_text_encoder(str(out_dir))`. Defaults are tiny (tests); hidden 512,
    12 layers, 8 heads, projection 512 give the ViT-B/32 text tower's cost (benchmarks).
    `overrides` go to CLIPTextConfig (e.g. intermediate_size, hidden_act)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection
    out_dir = Path(out_dir)
    kwargs: dict[str, Any] = dict(
        vocab_size=CLIP_VOCAB_SIZE, hidden_size=hidden_size, intermediate_size=4 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=heads, max_position_embeddings=77,
        projection_dim=projection_dim,
        # eos_token_id = 49407 (not the legacy 2) makes HF pool at the first EOS token, like OpenAI CLIP;
        # padding uses <|endoftext|> too, as the openai/clip-vit-base-patch32 tokenizer does.
        bos_token_id=CLIP_BOS_ID, eos_token_id=CLIP_EOS_ID, pad_token_id=CLIP_EOS_ID)
    kwargs.update(overrides)
    config = CLIPTextConfig(**kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPTextModelWithProjection(config)
    model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    with _quiet_transformers():
        model.save_pretrained(str(out_dir))
    write_clip_tokenizer_files(out_dir)
    return out_dir
