"""clipft.preprocess: the inference copy of the evaluation-time image path equals clipft.data's, bit for bit."""

from pathlib import Path

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


# --------------------------------------------------------------------------- one rule for every path

def _tiny_model(size: int = 64):
    """A random resnet18 tower behind the inference API (no text side needed: images only)."""
    from clipft.config import ModelConfig
    from clipft.inference import _clipft_model, _torch_tower
    from clipft.model import ImageTower
    torch.manual_seed(0)
    tower = ImageTower(ModelConfig(backbone="resnet18", image_weights="none", head_hidden=32), 16).eval()
    dev = torch.device("cpu")
    return _clipft_model("tiny", tower, tower.state_dict(), size, MEAN, STD, None, dev, "torch",
                         _torch_tower(tower, dev))


def _query_files(root):
    """An RGBA PNG that is mostly transparent (colour under the clear part), a large JPEG (DCT draft
    decoding applies), a palette GIF with a transparent index and a plain small JPEG."""
    rng = np.random.default_rng(3)
    root.mkdir(parents=True, exist_ok=True)
    rgba = rng.integers(0, 256, (120, 160, 4), dtype=np.uint8)
    rgba[:, :110, 3] = 0  # the left two thirds fully transparent: white, not the black (or colour) under it
    Image.fromarray(rgba, "RGBA").save(root / "clear.png")
    big = np.kron(rng.integers(0, 256, (75, 100, 3), dtype=np.uint8), np.ones((16, 16, 1), dtype=np.uint8))
    big = (big.astype(np.int16) + rng.integers(-20, 20, big.shape)).clip(0, 255).astype(np.uint8)
    Image.fromarray(big).save(root / "big.jpg", quality=90)  # 1600 x 1200
    pal = Image.fromarray(rng.integers(0, 256, (90, 70, 3), dtype=np.uint8)).convert("P")
    pal.info["transparency"] = 0
    pal.save(root / "pal.gif", transparency=0)
    Image.fromarray(rng.integers(0, 256, (50, 80, 3), dtype=np.uint8)).save(root / "small.jpg")
    return ["clear.png", "big.jpg", "pal.gif", "small.jpg"]


def test_a_file_used_as_a_query_matches_its_own_indexed_embedding(tmp_path):
    """The search query path and the index (embed) path preprocess a file identically, fp32."""
    from clipft.embed import embed_paths
    from clipft.search.query import embed_query_image
    model = _tiny_model()
    names = _query_files(tmp_path / "photos")
    emb, rows = embed_paths(model, tmp_path / "photos", [Path(n) for n in names], workers=0, progress=False)
    assert rows == list(range(len(names)))
    for i, name in enumerate(names):
        q = embed_query_image(model, tmp_path / "photos" / name)
        cos = float(torch.nn.functional.cosine_similarity(q, emb[i], dim=0))
        assert cos >= 0.9999, (name, cos)
        # and the API's own path for a file (encode_images) is the same rule
        api = model.encode_images([tmp_path / "photos" / name])[0]
        assert torch.allclose(api, emb[i], atol=1e-6), name


def test_query_pixels_composite_transparency_on_white_and_draft_decode(tmp_path):
    """The pixels, not only the embeddings: a fully transparent area is white after preprocessing,
    and a large JPEG is decoded at the model's DCT draft scale like evaluation does."""
    from clipft.data import build_transform, load_image
    from clipft.preprocess import preprocess_file
    model = _tiny_model()
    names = _query_files(tmp_path / "photos")
    tf = build_transform(64, MEAN, STD, train=False)
    for name in names:
        path = tmp_path / "photos" / name
        px, reason = preprocess_file(path, model.preprocess, model.draft_size)
        assert reason is None
        assert torch.equal(px, tf(load_image(path, draft_size=64)[0])), name  # evaluation's pixels, bit for bit
    clear, _ = preprocess_file(tmp_path / "photos" / "clear.png", model.preprocess, model.draft_size)
    white = (1.0 - torch.tensor(MEAN)) / torch.tensor(STD)
    assert torch.allclose(clear[:, 32, 5], white, atol=1e-5)  # a left pixel: transparent -> white


def test_one_geometry_and_one_processor_wrapper():
    """The twins are one: the data transform's geometry is the inference transform's, and the HF
    processor wrapper of the API and of the CLIP baseline is one class."""
    import clipft.data.images as images
    import clipft.eval.clip_baseline as baseline
    import clipft.inference as inference
    import clipft.preprocess as pre
    assert images.CenterSquareResize is pre.CenterSquareResize
    assert inference.ProcessorTransform is baseline.ProcessorTransform is pre.ProcessorTransform
    assert isinstance(pre.EvalTransform(8, MEAN, STD).square, pre.CenterSquareResize)


def test_preprocess_imports_without_datasets_or_training(tmp_path):
    import subprocess
    import sys
    code = ("import sys, clipft.preprocess; bad = [m for m in sys.modules if m.startswith(('clipft.data', "
            "'clipft.train', 'clipft.eval', 'torchvision.datasets', 'torchvision.models'))]; print(bad); "
            "sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


# --------------------------------------------------------------------------- prepared cache = JPEG path

PREPARED_TOLERANCE = 1e-5  # normalised units: (x - 255 mean) / (255 std) vs (x / 255 - mean) / std in fp32


def test_prepared_cache_gives_the_evaluation_pixels(tmp_path):
    """With the default settings the prepared cache stores each image at the evaluation geometry
    (JPEG draft at data.image_size, centre square, bicubic to data.image_size), so what training
    reads from it equals the JPEG path's (= evaluation's) model input: the uint8 pixels bit for bit,
    the normalised input within PREPARED_TOLERANCE."""
    from clipft.config import Config
    from clipft.data import build_transform, load_coco_captions, load_image
    from clipft.data.device_transform import DeviceTransform
    from clipft.data.prepared_reader import PreparedImages
    from clipft.data.prepare import prepare_split
    from clipft.data.shapes import make_shapes_dataset
    root = make_shapes_dataset(tmp_path / "coco", n_train=4, n_val=2, seed=0, image_size=48)
    split = load_coco_captions(root, "train")
    rng = np.random.default_rng(0)
    for i, rec in enumerate(split.images):  # photo-like sizes: bigger than the cache, not square
        w, h = [(640, 480), (500, 375), (427, 640), (1024, 768)][i]
        small = rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize((w, h), Image.BILINEAR).save(rec.path, format="JPEG", quality=92)
    cfg = Config()
    cfg.data.num_workers = 0
    info = prepare_split(root, "train", cfg, workers=1, progress=False)
    prepared = PreparedImages.open(info["path"])
    size = cfg.data.image_size
    jpeg = build_transform(size, cfg.data.mean, cfg.data.std, train=False)
    dev_tf = DeviceTransform(size, cfg.data.mean, cfg.data.std)
    got = dev_tf(torch.from_numpy(np.array(prepared.array)))  # [4, 3, size, size]
    for i, rec in enumerate(split.images):
        want = jpeg(load_image(rec.path, draft_size=size)[0])
        assert got.shape[1:] == want.shape
        diff = float((got[i] - want).abs().max())
        assert diff <= PREPARED_TOLERANCE, (rec.path.name, diff)
