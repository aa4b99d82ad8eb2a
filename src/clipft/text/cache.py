"""The caption cache: embed every caption once with the frozen encoder and keep the embeddings on disk,
keyed by a fingerprint of (encoder identity, precision, captions) and guarded by a checksum of their
content; a cache that does not match is rebuilt (or refused, `on_mismatch="error"`).
"""

from __future__ import annotations

import hashlib
import logging
import json
import os
import time
from pathlib import Path

import torch

from ..runtime import apply_umask, check_free_space, ensure_writable_dir, make_parent_dir, storage_error
from .encoder import TextEncoder, TextEncoderError, _first_line, load_text_encoder

log = logging.getLogger(__name__)

ON_MISMATCH = ("rebuild", "error")
CACHE_TENSOR = "embeds"


def caption_digest(captions: list[str]) -> str:
    """sha256 over the captions in order, each length-prefixed (so no separator is ambiguous)."""
    h = hashlib.sha256(f"{len(captions)}\n".encode())
    for c in captions:
        b = c.encode("utf-8")
        h.update(f"{len(b)}:".encode())
        h.update(b)
    return h.hexdigest()


def precision_name(amp_dtype: torch.dtype | None) -> str:
    """"float32", "bfloat16" or "float16": the precision captions are encoded in."""
    return str(amp_dtype).replace("torch.", "") if amp_dtype is not None else "float32"


def cache_fingerprint(encoder_identity: str, captions: list[str], precision: str = "float32") -> str:
    """What a text cache must match to be reused: the encoder identity, the precision the captions
    are encoded in (bf16 autocast gives embeddings ~1e-3 away from fp32 ones: not the same cache),
    and the exact caption list."""
    h = hashlib.sha256(encoder_identity.encode("utf-8"))
    h.update(b"\0")
    if precision != "float32":  # fp32 keeps the fingerprints caches were written with before
        h.update(f"precision={precision}".encode() + b"\0")
    h.update(caption_digest(captions).encode())
    return h.hexdigest()


class _CorruptCache(Exception):
    pass


def _content_digest(emb: torch.Tensor) -> str:
    """blake2b-128 of the embeddings' bytes [M * D * 4] (hex): stored in the cache's metadata at save,
    checked at every read (~1 GB/s: a fraction of a second for COCO's 600k captions x 512)."""
    return hashlib.blake2b(emb.contiguous().reshape(-1).view(torch.uint8).numpy().data, digest_size=16).hexdigest()


def _read_cache(path: Path) -> tuple[torch.Tensor, dict[str, str]]:
    """-> (embeds [M, D], metadata); _CorruptCache if the file is unreadable or inconsistent."""
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            if CACHE_TENSOR not in f.keys():
                raise _CorruptCache(f"no {CACHE_TENSOR!r} tensor")
            emb = f.get_tensor(CACHE_TENSOR)
    except _CorruptCache:
        raise
    except Exception as e:  # safetensors raises its own error types for truncated/garbled files
        raise _CorruptCache(_first_line(e)) from None
    try:
        n, d = int(meta["num_captions"]), int(meta["dim"])
    except (KeyError, ValueError):
        raise _CorruptCache("metadata lacks num_captions/dim") from None
    if emb.dtype != torch.float32 or emb.shape != (n, d) or "fingerprint" not in meta:
        raise _CorruptCache(f"tensor {tuple(emb.shape)} {emb.dtype} does not match its metadata ({n}, {d})")
    bad = int((~torch.isfinite(emb).all(dim=1)).sum()) if emb.numel() else 0
    if bad:  # the right size but NaN/inf rows: never train or evaluate on them
        raise _CorruptCache(f"{bad} of {n} embeddings are not finite")
    stored = meta.get("content_blake2b")  # absent in caches written before checksums: read unchecked
    if stored is not None and stored != _content_digest(emb):
        raise _CorruptCache("its embeddings do not match their checksum: the file was damaged after it was written")
    return emb, meta


def load_text_cache(path: Path, expected_fingerprint: str | None = None) -> torch.Tensor | None:
    """Cached embeddings [M, D], or None (with a log line saying why) if the file is missing,
    unreadable, or was built for another fingerprint."""
    path = Path(path)
    if not path.is_file():
        log.debug("text cache %s: not found", path)
        return None
    try:
        emb, meta = _read_cache(path)
    except _CorruptCache as e:
        log.warning("text cache %s is unreadable (%s); it will be rebuilt", path, e)
        return None
    if expected_fingerprint is not None and meta["fingerprint"] != expected_fingerprint:
        log.info("text cache %s was built for other captions or another encoder; ignoring it", path)
        return None
    return emb


def save_text_cache(path: Path, embeds: torch.Tensor, fingerprint: str, meta: dict) -> None:
    """Write embeds [M, D] as safetensors with string metadata; atomic (temp file + os.replace),
    with the process umask; StorageError (one line) when the disk is full or the folder read-only."""
    from safetensors.torch import save_file
    path = Path(path)
    make_parent_dir(path)
    embeds = embeds.detach().to("cpu", torch.float32).contiguous()
    if embeds.ndim != 2:
        raise TextEncoderError(f"{path}: text embeddings must be 2-D [M, D], got {tuple(embeds.shape)}")
    metadata = {str(k): v if isinstance(v, str) else json.dumps(v, default=str) for k, v in meta.items()}
    metadata.update(fingerprint=fingerprint, num_captions=str(embeds.shape[0]), dim=str(embeds.shape[1]),
                    content_blake2b=_content_digest(embeds))
    metadata.setdefault("format", "clipft-text-cache-v1")
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        save_file({CACHE_TENSOR: embeds}, str(tmp), metadata=metadata)
        apply_umask(tmp)  # safetensors creates 0600: others on a shared cluster could not read the cache
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except Exception as e:
        err = storage_error(path, e, needed=embeds.numel() * 4)
        if err is not None:
            raise err from None
        raise
    finally:
        if tmp.exists():
            tmp.unlink()


def get_text_embeddings(captions: list[str], encoder_name: str, cache_file: Path, device: str | torch.device = "cpu",
                        batch_size: int = 256, max_length: int = 77, on_mismatch: str = "rebuild",
                        encoder: TextEncoder | None = None, progress: bool | None = None,
                        amp: str = "auto") -> tuple[torch.Tensor, dict]:
    """Caption embeddings [M, D] (caption order) from `cache_file` if its fingerprint matches, else
    built with the frozen encoder and saved. on_mismatch="error" refuses to overwrite a cache built
    from other captions or another encoder. Pass `encoder` to reuse a loaded one (its own `amp` then
    applies); amp: train.amp for the encoder loaded here. The precision is part of the fingerprint.
    progress: a captions bar with captions/s and ETA (None: only when stderr is a terminal).
    Returns (embeds, info) with info keys path, built, seconds, fingerprint, encoder, num_captions, dim,
    encoder_fingerprint."""
    if on_mismatch not in ON_MISMATCH:
        raise TextEncoderError(f"text.on_mismatch must be one of {', '.join(ON_MISMATCH)}, got {on_mismatch!r}")
    t0 = time.perf_counter()
    captions = list(captions)
    cache_file = Path(cache_file)
    enc = encoder if encoder is not None else load_text_encoder(encoder_name, device=device, max_length=max_length,
                                                                amp=amp)
    precision = precision_name(enc.amp_dtype)
    fp = cache_fingerprint(enc.identity, captions, precision)
    digest = caption_digest(captions)

    def info(built: bool, emb: torch.Tensor) -> dict:
        return {"path": str(cache_file), "built": built, "seconds": time.perf_counter() - t0, "fingerprint": fp,
                "encoder": enc.name, "num_captions": int(emb.shape[0]), "dim": int(emb.shape[1]),
                # the encoder's own fingerprint (what an export records): a loaded model needs no encoder for it
                "encoder_fingerprint": hashlib.sha256(enc.identity.encode("utf-8")).hexdigest()}

    if cache_file.is_file():
        try:
            emb, meta = _read_cache(cache_file)
        except _CorruptCache as e:
            log.warning("text cache %s is unreadable (%s); rebuilding it", cache_file, e)
        else:
            if meta["fingerprint"] == fp:
                log.info("text cache %s: %d captions x %d, fingerprint matches", cache_file, *emb.shape)
                return emb, info(False, emb)
            what = ("the captions differ" if meta.get("caption_digest") != digest
                    else f"it was encoded in {meta.get('precision', 'float32')}, this run encodes in {precision}"
                    if meta.get("precision", "float32") != precision
                    else "the text encoder differs (name, config, max_length or weights)")
            cached = f"cached: encoder {meta.get('encoder', '?')!r}, {meta.get('num_captions')} captions"
            wanted = f"now: encoder {enc.name!r}, {len(captions)} captions"
            if on_mismatch == "error":
                raise TextEncoderError(f"{cache_file}: text cache does not match ({what}; {cached}; {wanted}); "
                                       "delete it or set text.on_mismatch=rebuild")
            log.warning("text cache %s does not match (%s; %s; %s); rebuilding it", cache_file, what, cached, wanted)
    # Where the result goes is checked before the embedding, not after it.
    ensure_writable_dir(cache_file.parent, "set text.cache_dir to a writable folder")
    check_free_space(cache_file.parent, len(captions) * enc.dim * 4)
    log.info("embedding %d captions with %s (%s) -> %s", len(captions), enc.name, enc.kind, cache_file)
    emb = enc.encode(captions, batch_size=batch_size, progress=progress)
    save_text_cache(cache_file, emb, fp, {"encoder": enc.name, "kind": enc.kind, "caption_digest": digest,
                                          "max_length": enc.max_length,
                                          "precision": precision})
    return emb, info(True, emb)


