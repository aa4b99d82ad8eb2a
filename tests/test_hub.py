"""clipft.hub: no network is found out with one connection, then Hugging Face runs offline (local
cache only): a cached model loads, a missing one fails at once in one line."""

from __future__ import annotations

import pytest

from clipft.text import load_text_encoder


@pytest.fixture
def hub_state(monkeypatch):
    """A clean probe state and hub mode for one test, restored afterwards."""
    from huggingface_hub import constants

    import clipft.hub as hub_mod
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub_mod, "_HUB", {})
    return constants


def test_no_network_is_detected_once_and_switches_to_offline_mode(hub_state, caplog):
    from clipft.hub import hub_offline
    calls = []

    def refuse(address, timeout):
        calls.append(address)
        raise OSError("Name or service not known")
    assert hub_offline(connect=refuse) is True
    assert hub_offline(connect=refuse) is True
    assert len(calls) == 1  # one probe per process, not one per file and retry
    assert hub_state.HF_HUB_OFFLINE is True
    warnings = [r for r in caplog.records if "offline mode" in r.getMessage()]
    assert len(warnings) == 1


def test_reachable_hub_stays_online(hub_state):
    from clipft.hub import hub_offline

    class Conn:
        def close(self):
            pass
    assert hub_offline(connect=lambda address, timeout: Conn()) is False
    assert hub_state.HF_HUB_OFFLINE is False


def test_uncached_hub_model_offline_fails_in_one_line(hub_state, tmp_path, monkeypatch):
    from clipft.text import TextEncoderUnavailable
    monkeypatch.setattr(hub_state, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_state, "HF_HUB_CACHE", str(tmp_path))  # an empty cache
    with pytest.raises(TextEncoderUnavailable, match="--set text.encoder=") as e:
        load_text_encoder("openai/clip-vit-base-patch32")
    assert "\n" not in str(e.value)


def test_cached_hub_model_loads_offline(hub_state, tmp_path, monkeypatch, tiny_clip_dir):
    """Offline, a hub name in the local HF cache loads from it (the cache layout: models--org--name)."""
    import shutil
    snap = tmp_path / "models--someorg--tiny-clip" / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_clip_dir, snap)
    (tmp_path / "models--someorg--tiny-clip" / "refs").mkdir()
    (tmp_path / "models--someorg--tiny-clip" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(hub_state, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_state, "HF_HUB_CACHE", str(tmp_path))
    enc = load_text_encoder("someorg/tiny-clip")
    assert enc.kind == "clip" and enc.encode(["a red circle"]).shape == (1, enc.dim)
