"""Access to the Hugging Face hub: whether it can be reached at all, decided once per process.

Offline, huggingface_hub retries every file of a model several times with growing waits (about 25 s
per command, ten warning lines). One quick connection tells instead: when it fails, the process
switches to offline mode, where a model in the local HF cache loads at once and a missing one fails
at once.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

log = logging.getLogger(__name__)

_HUB: dict[str, bool] = {}  # {"reachable": bool} once probed in this process


def _hub_address(endpoint: str) -> tuple[str, int]:
    """(host, port) a hub request connects to first: the HTTPS proxy when one is set, else the endpoint."""
    from urllib.parse import urlsplit
    from urllib.request import getproxies
    target = urlsplit(getproxies().get("https") or endpoint)
    return target.hostname or "huggingface.co", target.port or (443 if target.scheme == "https" else 80)


def hub_offline(connect: Any = None, timeout: float = 3.0) -> bool:
    """True when the Hugging Face hub cannot be used, decided once per process: HF_HUB_OFFLINE is set,
    or one quick connection to the hub (or its proxy) fails. Then huggingface_hub is switched to
    offline mode for the rest of the process, so a hub name costs one failed connection instead of
    ~25 s of retries per file, and loads from the local HF cache when the model is there.
    `connect(address, timeout)` is the probe (default socket.create_connection; tests pass their own)."""
    from huggingface_hub import constants
    if constants.HF_HUB_OFFLINE:
        return True
    if "reachable" not in _HUB:
        host, port = _hub_address(constants.ENDPOINT)
        try:
            (connect or socket.create_connection)((host, port), timeout).close()
            _HUB["reachable"] = True
        except OSError as e:
            _HUB["reachable"] = False
            os.environ["HF_HUB_OFFLINE"] = "1"  # read by child processes and by libraries that check the env
            constants.HF_HUB_OFFLINE = True  # read by huggingface_hub and transformers at every call
            why = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}" if str(e) else type(e).__name__
            log.warning("cannot reach %s:%d (%s): no network, so Hugging Face models load from the local cache "
                        "only (offline mode)", host, port, why)
    return not _HUB["reachable"]


def names_local_path(text: str) -> bool:
    """Whether a model source can only be a path, never a hub name: an absolute, home or dotted
    relative path, two or more slashes, a backslash, a trailing slash, or a checkpoint/weights suffix.
    Such a source that does not exist is "not found", without asking the hub (whose repo-id message
    would hide that) and without importing torch (the CLI checks it before anything loads)."""
    from pathlib import Path
    return (text.startswith(("/", ".", "~")) or text.count("/") > 1 or "\\" in text or text.endswith("/")
            or Path(text).suffix.lower() in (".pt", ".pth", ".ckpt", ".safetensors", ".bin", ".onnx"))
