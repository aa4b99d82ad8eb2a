"""clipft.preprocess: the inference copy of the evaluation-time image path equals clipft.data's, bit for bit."""

import numpy as np
import pytest
import torch
from PIL import Image

from clipft.data import build_transform, load_image
from clipft.preprocess import EvalTransform, decode_image, pil_from_uint8, to_rgb

MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def _images(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (61, 83, 3), dtype=np.uint8)
    files = {}
    files["photo.jpg"] = Image.fromarray(rgb)
    files["tall.png"] = Image.fromarray(rgb.transpose(1, 0, 2).copy())
    files["palette.gif"] = Image.fromarray(rgb).convert("P")
    rgba = np.concatenate([rgb, rng.integers(0, 256, (61, 83, 1), dtype=np.uint8)], axis=2)
    files["alpha.png"] = Image.fromarray(rgba)
    files["grey16.png"] = Image.fromarray(rng.integers(0, 65535, (40, 50), dtype=np.uint16))
    files["grey.bmp"] = Image.fromarray(rgb[..., 0])
    files["photo.webp"] = Image.fromarray(rgb)
    paths = []
    for name, im in files.items():
        im.save(tmp_path / name)
        paths.append(tmp_path / name)
    return paths


@pytest.mark.parametrize("size", [32, 24])
def test_decode_and_transform_equal_the_evaluation_path(tmp_path, size):
    ours, theirs = EvalTransform(size, MEAN, STD), build_transform(size, MEAN, STD, train=False)
    for path in _images(tmp_path):
        a, reason = decode_image(path, draft_size=size)
        b, _ = load_image(path, draft_size=size)
        assert reason is None and a.mode == "RGB"
        assert np.array_equal(np.asarray(a), np.asarray(b)), path.name
        assert torch.equal(ours(a), theirs(b)), path.name


def test_bad_files_give_reasons_not_exceptions(tmp_path):
    (tmp_path / "junk.jpg").write_bytes(b"junk")
    good = tmp_path / "ok.jpg"
    Image.new("RGB", (64, 64), (1, 2, 3)).save(good)
    (tmp_path / "cut.jpg").write_bytes(good.read_bytes()[:200])
    assert decode_image(tmp_path / "nope.jpg") == (None, "missing")
    assert decode_image(tmp_path / "junk.jpg")[1].startswith("undecodable")
    img, reason = decode_image(tmp_path / "cut.jpg")
    assert img is None and reason.startswith(("truncated", "undecodable"))
    assert decode_image(tmp_path)[1].startswith("unreadable")


def test_uint8_tensor_round_trip():
    t = torch.randint(0, 256, (3, 5, 7), dtype=torch.uint8)
    im = pil_from_uint8(t)
    assert im.size == (7, 5) and torch.equal(torch.from_numpy(np.array(im)).permute(2, 0, 1), t)
    assert to_rgb(im) is im
    with pytest.raises(ValueError, match="uint8 pixels"):
        pil_from_uint8(t.float())
