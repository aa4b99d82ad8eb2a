"""The frozen text side: `encoder` loads a text encoder (a CLIP text tower or a sentence-transformers
model) frozen and embeds captions; `cache` embeds every caption once and keeps the embeddings on disk,
keyed by a fingerprint of (encoder, precision, captions); `offline_assets` writes a CLIP tokenizer and
a small random CLIP text tower without network access (tests, benchmarks)."""

from .cache import (CACHE_TENSOR, ON_MISMATCH, cache_fingerprint, caption_digest, get_text_embeddings,
                    load_text_cache, precision_name, save_text_cache)
from .encoder import (CLIP_BOS_ID, CLIP_EOS_ID, CLIP_MODEL_TYPES, CLIP_NUM_MERGES, CLIP_VOCAB_SIZE, KINDS,
                      MINILM_ALIASES, MINILM_NAME, TextEncoder, TextEncoderError, TextEncoderUnavailable,
                      _NoBar, _progress, _quiet_transformers,  # noqa: F401 (used by inference, clip_baseline)
                      assert_frozen, load_text_encoder, weights_digest)
from .offline_assets import default_bpe_path, save_random_clip_text_model, write_clip_tokenizer_files

__all__ = ["CACHE_TENSOR", "ON_MISMATCH", "cache_fingerprint", "caption_digest", "get_text_embeddings",
           "load_text_cache", "precision_name", "save_text_cache", "CLIP_BOS_ID", "CLIP_EOS_ID", "CLIP_MODEL_TYPES",
           "CLIP_NUM_MERGES", "CLIP_VOCAB_SIZE", "KINDS", "MINILM_ALIASES", "MINILM_NAME", "TextEncoder",
           "TextEncoderError", "TextEncoderUnavailable", "assert_frozen", "load_text_encoder", "weights_digest",
           "default_bpe_path", "save_random_clip_text_model", "write_clip_tokenizer_files"]
