"""Shared SNAC test weights: written once per test session, never downloaded.

The root ``tests/conftest.py`` imports the fixtures, so every test can ask for
``snac_weights`` or ``snac_model``; ``snac_weights_dir()`` serves code outside a fixture.

The weights are the real 24 kHz architecture with seeded random values and
``"noise": false``, so decoding is deterministic and exactness can be checked.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from gateway.decoder.snac_model import LoadedModel

_lock = threading.Lock()
_dir: Path | None = None


def snac_weights_dir() -> Path:
    """A directory with ``config.json`` + ``pytorch_model.bin`` (seed 0, no noise), written
    on first use in this process (~80 MB, about a second) and reused afterwards."""
    global _dir
    with _lock:
        if _dir is None:
            from gateway.decoder.snac_model import write_random_weights

            root = Path(tempfile.mkdtemp(prefix="voicegw-snac-test-"))
            atexit.register(shutil.rmtree, root, ignore_errors=True)
            _dir = write_random_weights(root / "snac_24khz_random", seed=0, noise=False)
        return _dir


@pytest.fixture(scope="session")
def snac_weights() -> Path:
    return snac_weights_dir()


@pytest.fixture(scope="session")
def snac_model(snac_weights: Path) -> LoadedModel:
    """The test weights loaded on CPU in float32, through the production loader."""
    from gateway.config import UpstreamSettings
    from gateway.decoder.snac_model import load_snac

    return load_snac(UpstreamSettings(snac_model=str(snac_weights), snac_device="cpu"), demo=False)
