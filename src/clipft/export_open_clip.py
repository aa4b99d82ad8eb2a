"""The export folder as a whole open_clip model: `open_clip.create_model_and_transforms("local-dir:DIR")`.

    DIR/open_clip_config.json        {"model_cfg": {embed_dim, quick_gelu, vision_cfg, text_cfg},
                                      "preprocess_cfg": {mean, std, interpolation, resize_mode}}
    DIR/open_clip_model.safetensors  open_clip CLIP state dict: visual.* (the image tower as open_clip's
                                      timm tower), the frozen text tower under open_clip's text names,
                                      logit_scale (log 1/tau, as open_clip stores it)

The image tower maps onto `open_clip.timm_model.TimmModel` when it pools by average and its head is
one Linear(F, D) (`timm_proj: linear`) or Linear(F, 2D) -> GELU -> Linear(2D, D) (`timm_proj: mlp`),
both with biases; the backbone becomes `timm_model_name` (a torchvision ResNet's parameter names are
timm's, so `resnet50` maps onto timm's `resnet50`; a `timm:NAME` backbone maps onto NAME).

The text tower maps onto open_clip's own TextTransformer when it is an HF CLIP text tower with
projection (OpenAI's BPE, pre-LN blocks, GELU or QuickGELU, LayerNorm eps 1e-5): q/k/v become one
in_proj, the projection Linear(H, D, bias=False) becomes text_projection [H, D] = weight.T, and the
context is clipft's max_length (the first max_length positions), so open_clip truncates like clipft.
Other text encoders (sentence-transformers, other HF towers) are refused with the reason.

Nothing is kept unchecked: the folder is written into a temporary directory, loaded there with
open_clip, and its encode_image / encode_text are compared with the clipft tower and the frozen
text encoder (max abs difference of L2-normalised embeddings <= OPEN_CLIP_TOLERANCE) before the
files are moved into the export folder.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from .model import ModelError

OPEN_CLIP_CONFIG, OPEN_CLIP_WEIGHTS = "open_clip_config.json", "open_clip_model.safetensors"
OPEN_CLIP_FILES = (OPEN_CLIP_CONFIG, OPEN_CLIP_WEIGHTS)
OPEN_CLIP_TOLERANCE = 1e-4
# Captions the text parity check embeds both ways: short, long (truncated), punctuation, empty.
PARITY_CAPTIONS = ("a photo of a dog.", "Two people riding bicycles along a busy street at night!", "",
                   "café, crème brûlée & 1234 numbers", " ".join(["a long caption about a red bus"] * 20))
CLIP_VOCAB_SIZE, CLIP_BOS_ID, CLIP_EOS_ID = 49408, 49406, 49407


def timm_model_name(backbone: str) -> str:
    """clipft's backbone name -> the timm model with the same parameter names: `timm:NAME` -> NAME,
    torchvision `resnetN` -> timm `resnetN` (timm's ResNet keeps torchvision's conv1/bn1/layerK names)."""
    return backbone[len("timm:"):] if backbone.startswith("timm:") else backbone


# --------------------------------------------------------------------------- image tower

def image_tower_form(tower) -> tuple[dict, dict[str, torch.Tensor]] | str:
    """(open_clip vision_cfg, state dict with `visual.` keys) for the tower, or why it does not map."""
    m, d = tower.cfg, tower.embed_dim
    layers = m.head_layers
    why = [w for bad, w in (
        (m.pooling != "avg", f"pooling {m.pooling} (open_clip's timm tower maps only average pooling here)"),
        (layers not in (1, 2), f"{layers} head layers (open_clip's timm_proj: linear = 1, mlp = 2)"),
        (layers == 2 and m.head_hidden != 2 * d, f"head hidden {m.head_hidden} != 2 x embedding {d} (timm_proj mlp)"),
        (m.head_norm != "none", f"head norm {m.head_norm}"),
        (m.head_residual, "residual head")) if bad]
    if why:
        return "; ".join(why)
    linears = [mod for mod in tower.head.net if isinstance(mod, torch.nn.Linear)]  # [fc] or [fc1, fc2]
    state = {"visual.trunk." + k[len("backbone."):]: v for k, v in tower.state_dict().items()
             if k.startswith("backbone.")}
    names = ("head.proj",) if layers == 1 else ("head.mlp.fc1", "head.mlp.fc2")
    for name, lin in zip(names, linears):
        state[f"visual.{name}.weight"], state[f"visual.{name}.bias"] = lin.weight.detach(), lin.bias.detach()
    cfg = {"timm_model_name": timm_model_name(m.backbone), "timm_model_pretrained": False, "timm_pool": "avg",
           "timm_proj": "linear" if layers == 1 else "mlp", "timm_proj_bias": True, "timm_drop": m.head_dropout,
           "image_size": None}  # filled by the caller
    return cfg, state


# --------------------------------------------------------------------------- text tower

def text_tower_form(encoder, embed_dim: int) -> tuple[dict, bool, dict[str, torch.Tensor]] | str:
    """(open_clip text_cfg, quick_gelu, state dict with open_clip's CLIP text keys) for a loaded clipft
    TextEncoder, or why it does not map onto open_clip's TextTransformer."""
    if encoder.kind != "clip":
        return (f"text encoder {encoder.name!r} is a {encoder.kind} model, not a CLIP text tower: open_clip's "
                "own text transformer cannot hold it, and its HF text tower (hf_model_name) rebuilds the "
                "transformer from a hub name or path when loaded, so the folder would not stand on its own")
    c = encoder.module.config
    act = getattr(c, "hidden_act", "quick_gelu")
    why = [w for bad, w in (
        (int(c.vocab_size) != CLIP_VOCAB_SIZE, f"vocabulary {c.vocab_size} (open_clip's CLIP BPE: {CLIP_VOCAB_SIZE})"),
        (act not in ("gelu", "quick_gelu"), f"activation {act} (open_clip: gelu or quick_gelu)"),
        (not math.isclose(float(getattr(c, "layer_norm_eps", 1e-5)), 1e-5),
         f"layer_norm_eps {getattr(c, 'layer_norm_eps', None)} (open_clip: 1e-5)"),
        (int(c.projection_dim) != embed_dim, f"projection {c.projection_dim} != embedding {embed_dim}"),
        (c.hidden_size % c.num_attention_heads != 0, "hidden size not divisible by heads"),
        (encoder.tokenizer is None or encoder.tokenizer.bos_token_id != CLIP_BOS_ID
         or encoder.tokenizer.eos_token_id != CLIP_EOS_ID, "tokenizer is not OpenAI's CLIP BPE")) if bad]
    if why:
        return f"text encoder {encoder.name!r}: " + "; ".join(why)
    sd = {k: v.detach().float().cpu() for k, v in encoder.module.state_dict().items()}
    ctx = int(encoder.max_length)
    p = "text_model."
    state = {"token_embedding.weight": sd[p + "embeddings.token_embedding.weight"],
             # [77, H] -> [max_length, H]: open_clip then pads/truncates to clipft's max_length too
             "positional_embedding": sd[p + "embeddings.position_embedding.weight"][:ctx],
             "ln_final.weight": sd[p + "final_layer_norm.weight"], "ln_final.bias": sd[p + "final_layer_norm.bias"],
             "text_projection": sd["text_projection.weight"].T}  # Linear weight [D, H] -> x @ P with P [H, D]
    for i in range(int(c.num_hidden_layers)):
        a, b = f"{p}encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            state[b + f"attn.in_proj_{kind}"] = torch.cat([sd[a + f"self_attn.{x}_proj.{kind}"] for x in "qkv"])
            for hf, oc in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"),
                           ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
                state[b + f"{oc}.{kind}"] = sd[a + f"{hf}.{kind}"]
    cfg = {"context_length": ctx, "vocab_size": int(c.vocab_size), "width": int(c.hidden_size),
           "heads": int(c.num_attention_heads), "layers": int(c.num_hidden_layers),
           "mlp_ratio": int(c.intermediate_size) / int(c.hidden_size)}
    return cfg, act == "quick_gelu", state


# --------------------------------------------------------------------------- the whole model

def open_clip_model_form(tower, encoder, config: dict) -> tuple[dict, dict[str, torch.Tensor]] | str:
    """(open_clip_config.json contents, open_clip_model.safetensors state) or why it does not map.
    `config` is the export's config.json (image_size, mean, std, logit_scale)."""
    image = image_tower_form(tower)
    text = text_tower_form(encoder, tower.embed_dim)
    why = [w for w in (image, text) if isinstance(w, str)]
    if why:
        return "; ".join(why)
    vision_cfg, vstate = image
    text_cfg, quick_gelu, tstate = text
    vision_cfg["image_size"] = int(config["image_size"])
    state = {**vstate, **tstate, "logit_scale": tower.logit_scale.detach().float().reshape(())}
    oc = {"model_cfg": {"embed_dim": int(tower.embed_dim), "quick_gelu": quick_gelu,  # timm towers ignore it
                        "vision_cfg": vision_cfg, "text_cfg": text_cfg},
          "preprocess_cfg": {"mean": [float(x) for x in config["mean"]], "std": [float(x) for x in config["std"]],
                             "interpolation": "bicubic", "resize_mode": "shortest"},
          "clipft": {"text_encoder": config["text_encoder"]["name"], "logit_scale": config["logit_scale"]}}
    return oc, {k: v.detach().float().contiguous() for k, v in state.items()}


def tower_embeddings(tower, pixels: torch.Tensor) -> torch.Tensor:
    """clipft's image tower on pixels [B, 3, S, S] -> L2-normalised [B, D] float32, whether its forward
    returns the embeddings or (embeddings, logit scale)."""
    out = tower.eval()(pixels)
    if isinstance(out, (tuple, list)):
        out = out[0]
    return F.normalize(out.float(), dim=-1)


def open_clip_parity(folder: Path, tower, encoder, pixels: torch.Tensor,
                     captions: Sequence[str] = PARITY_CAPTIONS) -> dict[str, float]:
    """Load `folder` with open_clip's own loader and compare: encode_image on `pixels` [B, 3, S, S]
    with the clipft tower, encode_text on `captions` (open_clip's tokenizer) with the frozen text
    encoder, and exp(logit_scale). Max abs differences of L2-normalised float32 embeddings."""
    try:
        import open_clip
    except ImportError:
        raise ModelError("the open_clip form needs open_clip_torch and timm: pip install open_clip_torch") from None
    name = f"local-dir:{folder}"
    previous = logging.root.manager.disable
    logging.disable(logging.INFO)  # open_clip narrates every step on the root logger at INFO
    try:
        model = open_clip.create_model(name, device="cpu").eval()
        tokenizer = open_clip.get_tokenizer(name)
    finally:
        logging.disable(previous)
    with torch.inference_mode():
        img = F.normalize(model.encode_image(pixels).float(), dim=-1)
        txt = F.normalize(model.encode_text(tokenizer(list(captions))).float(), dim=-1)
        want_img = tower_embeddings(tower, pixels)
    want_txt = encoder.encode(list(captions))
    scale = float(model.logit_scale.detach().exp())
    return {"image_max_abs_diff": float((img - want_img).abs().max()),
            "text_max_abs_diff": float((txt - want_txt).abs().max()),
            "logit_scale_abs_diff": abs(scale - float(tower.logit_scale.detach().exp())),
            "checked_images": int(pixels.shape[0]), "checked_captions": len(captions)}


def missing_packages() -> list[str]:
    """The packages open_clip's loader needs that are not installed (it builds the image tower with timm)."""
    import importlib.util
    return [pkg for mod, pkg in (("open_clip", "open_clip_torch"), ("timm", "timm"))
            if importlib.util.find_spec(mod) is None]


def prepare_open_clip(out: Path, tower, config: dict, pixels: torch.Tensor, required: bool) -> tuple[Path | None, dict]:
    """Write the open_clip files into a temporary folder beside `out` and check them there.

    Returns (staging folder to `commit_open_clip` later, or None; the record for config.json's
    "open_clip" entry). A tower or text encoder that does not map, or a failed check, gives
    (None, {"written": False, "reason": ...}), or ModelError when `required` (--format open_clip).
    Nothing in `out` is touched here."""
    from safetensors.torch import save_file

    from .text import load_text_encoder

    def refuse(reason: str) -> tuple[None, dict]:
        if required:
            raise ModelError(f"{out}: cannot write the open_clip format: {reason}")
        return None, {"written": False, "reason": reason}

    missing = missing_packages()
    if missing:  # the check loads the folder with open_clip: without it nothing is written unchecked
        return refuse(f"{' and '.join(missing)} not installed (pip install 'clipft[open_clip]')")
    t = config["text_encoder"]
    encoder = load_text_encoder(t["name"], max_length=int(t.get("max_length", 77)), amp="off")
    form = open_clip_model_form(tower, encoder, config)

    if isinstance(form, str):
        return refuse(form)
    oc_cfg, state = form
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.open_clip.", dir=out.parent))
    try:
        save_file(state, str(stage / OPEN_CLIP_WEIGHTS), metadata={"format": "pt"})
        (stage / OPEN_CLIP_CONFIG).write_text(json.dumps(oc_cfg, indent=2) + "\n")
        try:
            parity = open_clip_parity(stage, tower, encoder, pixels)
        except ModelError:
            raise
        except Exception as e:  # open_clip / timm refusing the folder: say so, keep nothing
            shutil.rmtree(stage, ignore_errors=True)
            return refuse(f"open_clip could not load it ({type(e).__name__}: {str(e).splitlines()[0][:160]})")
        worst = max(parity["image_max_abs_diff"], parity["text_max_abs_diff"])
        if not worst <= OPEN_CLIP_TOLERANCE or parity["logit_scale_abs_diff"] > 1e-4 * max(1.0, config["logit_scale"]):
            shutil.rmtree(stage, ignore_errors=True)
            return refuse(f"open_clip's embeddings differ from clipft's by {worst:.2e} (max abs, > "
                          f"{OPEN_CLIP_TOLERANCE:g})")
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    record = {"written": True, "files": {"config": OPEN_CLIP_CONFIG, "weights": OPEN_CLIP_WEIGHTS},
              "load": f'open_clip.create_model_and_transforms("local-dir:DIR")',
              "timm_model_name": oc_cfg["model_cfg"]["vision_cfg"]["timm_model_name"],
              "text_tower": "open_clip TextTransformer (converted from the frozen HF CLIP text tower)",
              "tolerance": OPEN_CLIP_TOLERANCE, **parity}
    return stage, record


def commit_open_clip(stage: Path | None, out: Path) -> list[str]:
    """Move the checked files from `stage` into `out` (a rename each) and remove the staging folder;
    with stage None remove an earlier export's open_clip files (they would not match these weights)."""
    names = []
    for name in OPEN_CLIP_FILES:
        if stage is None:
            (out / name).unlink(missing_ok=True)
        else:
            os.replace(stage / name, out / name)
            names.append(name)
    if stage is not None:
        shutil.rmtree(stage, ignore_errors=True)
    return names


def discard(stage: Path | None) -> None:
    if stage is not None:
        shutil.rmtree(stage, ignore_errors=True)
