"""SNAC decoding: model loading, batched window decode, and the decode worker thread.

Names are imported lazily, so that importing the worker (or its fakes in tests) does not
pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DecodeStream": "gateway.decoder.worker",
    "DecodeWorker": "gateway.decoder.worker",
    "DecoderHealth": "gateway.decoder.worker",
    "DecoderStats": "gateway.decoder.worker",
    "WindowEngine": "gateway.decoder.worker",
    "SnacEngine": "gateway.decoder.engine",
    "decode_utterance": "gateway.decoder.engine",
    "measure_receptive_field": "gateway.decoder.engine",
    "snr_db": "gateway.decoder.engine",
    "LoadedModel": "gateway.decoder.snac_model",
    "load_snac": "gateway.decoder.snac_model",
    "write_random_weights": "gateway.decoder.snac_model",
    "build_random_snac": "gateway.decoder.snac_model",
    "SNAC_24KHZ_CONFIG": "gateway.decoder.snac_model",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'gateway.decoder' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
