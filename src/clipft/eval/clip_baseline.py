"""The original CLIP model as a baseline: its own image tower, image processor and text tower.

`clipft evaluate --compare-zero-shot openai/clip-vit-base-patch32` runs the same protocol on a
full HF `CLIPModel` (hub name or a directory written by save_pretrained with its tokenizer and
image-processor config) so a fine-tune can be read against the CLIP image encoder it replaces.
Images go through the model's own `CLIPImageProcessor` (resize, crop, CLIP normalisation), not
clipft's transform; captions are embedded by the model's own text tower through the regular
fingerprinted text cache (cache name = the model name), so a rerun does not re-embed them.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..data import CaptionedImages, EvalImageDataset, collate_eval
from ..model import ModelError
from ..preprocess import ProcessorTransform
from ..runtime import worker_count

log = logging.getLogger(__name__)


def load_clip_vision(name: str, device: torch.device) -> tuple[torch.nn.Module, Any]:
    """(CLIPVisionModelWithProjection in eval mode on `device`, CLIPImageProcessor) from a full CLIP
    checkpoint; ModelError naming the model when either cannot be loaded."""
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    from ..text import _quiet_transformers
    try:
        with _quiet_transformers():
            model = CLIPVisionModelWithProjection.from_pretrained(name)
    except Exception as e:  # OSError / hub errors / wrong model type all mean "not usable"
        raise ModelError(f"--compare-zero-shot {name}: could not load a CLIP vision tower "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); pass a full "
                         "CLIP model (hub name, or a directory written by CLIPModel.save_pretrained)") from e
    try:
        with _quiet_transformers():
            processor = CLIPImageProcessor.from_pretrained(name)
    except Exception as e:
        raise ModelError(f"--compare-zero-shot {name}: no image processor config (preprocessor_config.json) "
                         f"({type(e).__name__}); save it with CLIPImageProcessor.save_pretrained next to "
                         "the model") from e
    model.requires_grad_(False)
    return model.float().eval().to(device), processor


@torch.inference_mode()
def clip_image_embeddings(model: torch.nn.Module, processor: Any, data: CaptionedImages, device: torch.device,
                          batch_size: int = 256, num_workers: int = 0, amp_dtype: torch.dtype | None = None,
                          progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP image embeddings of a split: (emb [N_ok, D] L2-normalised fp32 CPU, rows [N_ok]),
    unreadable images left out exactly like `evaluate.embed_images` does."""
    # No JPEG draft decoding: the processor gets the fully decoded image, exactly as in HF's own usage,
    # so the baseline's numbers are CLIP's and not those of a different downsampling path.
    ds = EvalImageDataset(data, ProcessorTransform(processor), draft_size=None)
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=worker_count(num_workers),
                        collate_fn=collate_eval, pin_memory=device.type == "cuda")
    embs, rows = [], []
    for pixels, idx, _skipped in tqdm(loader, desc="embed images (CLIP)", disable=None if progress else True,
                                      leave=False):
        if pixels.shape[0] == 0:
            continue
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            out = model(pixel_values=pixels.to(device, non_blocking=True)).image_embeds  # [B, D]
        embs.append(F.normalize(out.float(), dim=-1).cpu())
        rows.append(idx)
    d = int(model.config.projection_dim)
    return (torch.cat(embs) if embs else torch.zeros(0, d)), (torch.cat(rows) if rows else torch.zeros(0, dtype=torch.long))


def clip_baseline_embeddings(name: str, data: CaptionedImages, cache_file: Path, device: torch.device,
                             batch_size: int = 256, num_workers: int = 0, max_length: int = 77,
                             amp_dtype: torch.dtype | None = None,
                             progress: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(image_emb [N_ok, D], rows [N_ok], text_emb [M, D]) of a full CLIP model on `data`."""
    from ..text import TextEncoderError, TextEncoderUnavailable, get_text_embeddings, load_text_encoder
    try:
        # Captions in the precision the images get (None = fp32), so both towers are measured alike.
        amp = {None: "off", torch.bfloat16: "bf16", torch.float16: "fp16"}[amp_dtype]
        encoder = load_text_encoder(name, device=device, max_length=max_length, amp=amp)
    except TextEncoderUnavailable as e:
        cause = str(e).split(" [", 1)[-1].split("]", 1)[0]
        raise ModelError(f"--compare-zero-shot {name}: not a local directory, and not loadable from the Hugging Face "
                         f"hub or the local HF cache (no network, or not cached) [{cause}]. Fix: pass a local "
                         "directory, e.g. --compare-zero-shot /path/to/clip-vit-base-patch32 (a full CLIPModel "
                         "saved with save_pretrained, with its tokenizer and preprocessor_config.json)") from None
    except TextEncoderError as e:
        raise ModelError(f"--compare-zero-shot {name}: its text tower could not be loaded ({e})") from None
    if encoder.kind != "clip":
        raise ModelError(f"--compare-zero-shot {name}: not a CLIP model (it loads as a {encoder.kind} encoder)")
    text_emb, _ = get_text_embeddings(data.captions, name, cache_file, device=device, batch_size=batch_size,
                                      max_length=max_length, encoder=encoder)
    del encoder
    model, processor = load_clip_vision(name, device)
    image_emb, rows = clip_image_embeddings(model, processor, data, device, batch_size=batch_size,
                                            num_workers=num_workers, amp_dtype=amp_dtype, progress=progress)
    return image_emb, rows, text_emb


def save_tiny_clip_model(out_dir: Path, image_size: int = 32, seed: int = 0) -> Path:
    """A randomly initialised tiny full CLIPModel (text hidden 32, vision hidden 32, patch 8,
    projection 16) with OpenAI's tokenizer and a CLIPImageProcessor config, saved offline-loadable:
    what the tests use for `--compare-zero-shot`."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from ..text import CLIP_BOS_ID, CLIP_EOS_ID, CLIP_VOCAB_SIZE, _quiet_transformers, write_clip_tokenizer_files
    text = dict(vocab_size=CLIP_VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=77, bos_token_id=CLIP_BOS_ID,
                eos_token_id=CLIP_EOS_ID, pad_token_id=CLIP_EOS_ID, projection_dim=16)
    # projection_dim also in the sub-configs: the towers loaded on their own read it from there
    # (as in openai/clip-vit-base-patch32, where all three say 512).
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  image_size=image_size, patch_size=8, projection_dim=16)
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config).eval()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with _quiet_transformers():
        model.save_pretrained(str(out_dir))
    CLIPImageProcessor(size={"shortest_edge": image_size},
                       crop_size={"height": image_size, "width": image_size}).save_pretrained(str(out_dir))
    write_clip_tokenizer_files(out_dir)
    return out_dir
