"""faiss, imported on first use with clipft's one-line error when it is missing (`clipft[ann]`)."""

from __future__ import annotations

import logging

from .index import SearchError


def _faiss():
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # it logs each CPU variant it tries at INFO
    try:
        import faiss
    except ImportError:
        raise SearchError("the approximate index needs faiss: pip install 'clipft[ann]'") from None
    return faiss
