"""`clipft export CKPT --out DIR --onnx --quantize int8`: an int8 image tower beside the float one.

    DIR/image_tower.int8.onnx   the float image_tower.onnx quantized by onnxruntime (static QDQ: int8
                                per-channel weights, uint8 activations calibrated on the run's
                                validation images); same input and output as the float file

It is measured before it is kept, on the run's validation images and captions (the float file's
embeddings are the reference):
  - cosine of each image's int8 embedding with its float embedding (mean and minimum), and
  - retrieval Recall@1/5/10 in both directions with the frozen text encoder's caption embeddings,
and refused (nothing written) when the mean cosine is below MIN_MEAN_COSINE or mean R@5 drops by
more than MAX_RECALL_DROP points. Both numbers and the measured speed-up (float seconds / int8
seconds over the same images, onnxruntime CPU) go into config.json ("onnx_int8") and the model card.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .inference import INT8_ONNX_FILE, file_sha256
from .model import ModelError

MIN_MEAN_COSINE = 0.99  # mean cosine(int8, float) over the validation images
MAX_RECALL_DROP = 2.0  # points of mean R@5 (image->text and text->image) the int8 file may lose
CALIBRATION_IMAGES = 32
MEASURE_IMAGES = 256
MODES = ("int8",)


def _val_split(ckpt_path: Path, cfg: dict):
    try:
        root = json.loads((ckpt_path.parent / "summary.json").read_text())["data_root"]
        from .config import from_dict
        from .data import load_split
        conf = from_dict(cfg)
        split = load_split(root, conf.data.val_split, conf.data)
    except Exception as e:  # noqa: BLE001 - no summary, moved data, ...
        raise ModelError(f"{ckpt_path}: --quantize measures the int8 file on the run's validation images and "
                         f"captions, which are not available ({type(e).__name__})") from None
    if not split.images:
        raise ModelError(f"{ckpt_path}: the run's validation split has no images to measure --quantize on")
    return split


def _session(path: Path):
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _run(session, pixels: torch.Tensor, batch: int = 16) -> torch.Tensor:
    outs = [session.run(["image_embeds"], {"pixel_values": pixels[s:s + batch].numpy()})[0]
            for s in range(0, pixels.shape[0], batch)]
    return F.normalize(torch.from_numpy(np.concatenate(outs)).float(), dim=-1)  # [N, D]


def _seconds(session, pixels: torch.Tensor, repeats: int = 3) -> float:
    _run(session, pixels[:2])  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        _run(session, pixels)
        best = min(best, time.perf_counter() - t)
    return best


def quantize_int8(float_onnx: Path, out_path: Path, calibration: torch.Tensor) -> Path:
    """Static int8 quantization (QDQ, per-channel weights) of `float_onnx`, calibrated on
    `calibration` [N, 3, S, S] pixel_values."""
    try:
        from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType, quant_pre_process,
                                              quantize_static)
    except ImportError:
        raise ModelError("--quantize needs onnxruntime: pip install 'clipft[onnx]'") from None

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter([{"pixel_values": calibration[i:i + 1].numpy()} for i in range(calibration.shape[0])])

        def get_next(self):
            return next(self.items, None)

    pre = out_path.with_name(out_path.name + ".pre.onnx")
    try:
        quant_pre_process(str(float_onnx), str(pre), skip_symbolic_shape=True)
        quantize_static(str(pre), str(out_path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        op_types_to_quantize=["Conv", "Gemm", "MatMul"])
    finally:
        pre.unlink(missing_ok=True)
        for extra in out_path.parent.glob(out_path.name + ".pre*"):
            extra.unlink(missing_ok=True)
    return out_path


def retrieval_recall(image_emb: torch.Tensor, text_emb: torch.Tensor, text_to_image: torch.Tensor,
                     ks=(1, 5, 10)) -> dict[str, dict[str, float]]:
    """COCO-protocol Recall@K in percent, as `clipft evaluate` counts it (kept here: the library does not
    import the evaluation tools). image_emb [N, D], text_emb [M, D], text_to_image [M] (image row per
    caption). A query's rank is the number of negatives scoring at least its best positive (ties count
    against it)."""
    s = image_emb.double() @ text_emb.double().T  # [N, M]
    pos = torch.zeros_like(s, dtype=torch.bool)
    pos[text_to_image, torch.arange(text_emb.shape[0])] = True
    best_i2t = s.masked_fill(~pos, float("-inf")).max(dim=1, keepdim=True).values  # [N, 1]
    rank_i2t = ((s >= best_i2t) & ~pos).sum(1)[pos.any(1)]  # images that own a caption
    best_t2i = s[text_to_image, torch.arange(text_emb.shape[0])]  # [M]
    rank_t2i = ((s >= best_t2i[None, :]) & ~pos).sum(0)  # [M]
    return {d: {f"R@{k}": 100.0 * float((r < k).double().mean()) for k in ks}
            for d, r in (("image_to_text", rank_i2t), ("text_to_image", rank_t2i))}


def _mean_r5(recall: dict[str, dict[str, float]]) -> float:
    return (recall["image_to_text"]["R@5"] + recall["text_to_image"]["R@5"]) / 2


def prepare_quantized(out: Path, ckpt_path: Path, cfg: dict, check_images, mode: str,
                      onnx_tmp: Path | None) -> tuple[Path, dict]:
    """Quantize the (already checked) float ONNX file `onnx_tmp` into a temporary file in `out`,
    measure it (module docstring) and return (temporary path, config.json "onnx_int8" record);
    ModelError, with nothing left behind, when it is refused."""
    from .inference import load
    if mode not in MODES:
        raise ModelError(f"--quantize must be one of {', '.join(MODES)}, got {mode!r}")
    if onnx_tmp is None or not onnx_tmp.is_file():
        raise ModelError("--quantize int8 needs --onnx: it quantizes the float ONNX image tower")
    split = _val_split(ckpt_path, cfg)
    images = split.images[:MEASURE_IMAGES]
    probe = load(ckpt_path)
    pixels, keep = [], []
    for i, rec in enumerate(images):
        try:
            pixels.append(probe.pixels(rec.path))
            keep.append(i)
        except ValueError:
            continue
    if not pixels:
        raise ModelError(f"{ckpt_path}: none of the validation images could be read to measure --quantize")
    x = torch.stack(pixels)  # [N, 3, S, S]
    captions = [c for i in keep for c in images[i].captions]
    text_to_image = torch.tensor([j for j, i in enumerate(keep) for _ in images[i].captions])
    tmp = out / (INT8_ONNX_FILE + ".tmp")
    try:
        quantize_int8(onnx_tmp, tmp, x[:CALIBRATION_IMAGES])
        f_sess, q_sess = _session(onnx_tmp), _session(tmp)
        f_emb, q_emb = _run(f_sess, x), _run(q_sess, x)
        cos = (f_emb * q_emb).sum(-1)  # [N]
        text = probe.encode_texts(captions)  # [M, D]
        r_float = retrieval_recall(f_emb, text, text_to_image)
        r_int8 = retrieval_recall(q_emb, text, text_to_image)
        drop = _mean_r5(r_float) - _mean_r5(r_int8)
        speedup = _seconds(f_sess, x) / max(_seconds(q_sess, x), 1e-9)
        record = {"file": INT8_ONNX_FILE, "method": "onnxruntime static QDQ int8 (per-channel weights, uint8 "
                  "activations)", "calibration_images": min(CALIBRATION_IMAGES, x.shape[0]),
                  "measured_images": int(x.shape[0]), "measured_captions": len(captions),
                  "mean_cosine": float(cos.mean()), "min_cosine": float(cos.min()),
                  "recall_float": r_float, "recall_int8": r_int8, "mean_r5_drop": float(drop),
                  "speedup": float(speedup), "bytes_float": onnx_tmp.stat().st_size, "bytes_int8": tmp.stat().st_size,
                  "sha256": file_sha256(tmp),
                  "thresholds": {"min_mean_cosine": MIN_MEAN_COSINE, "max_mean_r5_drop": MAX_RECALL_DROP}}
        if record["mean_cosine"] < MIN_MEAN_COSINE or drop > MAX_RECALL_DROP:
            raise ModelError(f"{out / INT8_ONNX_FILE}: refused, int8 mean cosine to the float tower "
                             f"{record['mean_cosine']:.4f} (min {MIN_MEAN_COSINE}) and mean R@5 drop {drop:.1f} points "
                             f"(max {MAX_RECALL_DROP:g}) on {x.shape[0]} validation images")
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp, record


def commit_quantized(tmp: Path | None, out: Path) -> list[str]:
    """Rename the measured int8 file into place, or remove an earlier export's (it would not match)."""
    if tmp is None:
        (out / INT8_ONNX_FILE).unlink(missing_ok=True)
        return []
    os.replace(tmp, out / INT8_ONNX_FILE)
    return [INT8_ONNX_FILE]
