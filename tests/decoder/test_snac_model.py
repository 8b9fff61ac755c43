from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest
import torch

from gateway.config import UpstreamSettings
from gateway.decoder.snac_model import (
    SNAC_24KHZ_CONFIG,
    LoadedModel,
    _check_24khz,
    build_random_snac,
    build_snac,
    load_snac,
    prepare_for_inference,
    receptive_field,
    write_random_weights,
)
from gateway.errors import ModelLoadError


def settings(model: str, device: str = "cpu", dtype: str = "float32") -> UpstreamSettings:
    return UpstreamSettings(snac_model=model, snac_device=device, snac_dtype=dtype)


def test_loads_a_local_directory(snac_model: LoadedModel, snac_weights: Path) -> None:
    assert snac_model.source == f"dir:{snac_weights}"
    assert not snac_model.random_weights
    assert not snac_model.noise
    assert (snac_model.device, snac_model.dtype) == ("cpu", "float32")
    assert snac_model.warnings == ()
    assert json.loads((snac_weights / "config.json").read_text()) == {
        **SNAC_24KHZ_CONFIG,
        "noise": False,
    }


def test_written_weights_are_reused(snac_weights: Path) -> None:
    before = (snac_weights / "pytorch_model.bin").stat().st_mtime_ns
    assert write_random_weights(snac_weights, seed=0, noise=False) == snac_weights
    assert (snac_weights / "pytorch_model.bin").stat().st_mtime_ns == before


def fill_hub_cache(cache: Path, repo_id: str, weights: Path) -> None:
    """The Hugging Face cache layout for ``repo_id``, filled from the test weights."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for name in ("config.json", "pytorch_model.bin"):
        (snap / name).symlink_to(weights / name)


@pytest.fixture
def no_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty hub cache and a hub endpoint that refuses connections (a closed loopback
    port), so nothing can reach the network. Returns the cache directory."""
    import socket

    from huggingface_hub import constants

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again when the block ends
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return cache


def test_hub_id_is_found_in_the_local_cache_without_the_network(
    snac_weights: Path, no_hub: Path
) -> None:
    fill_hub_cache(no_hub, "voicegw-test/cached", snac_weights)
    loaded = load_snac(settings("voicegw-test/cached"), demo=False)
    assert loaded.source == "hub:voicegw-test/cached"
    assert not loaded.random_weights


def test_unreachable_hub_fails_at_once_naming_the_cause(no_hub: Path) -> None:
    # huggingface_hub alone would retry for about 25 s before giving up.
    t0 = time.monotonic()
    with pytest.raises(ModelLoadError, match="unreachable") as info:
        load_snac(settings("voicegw-test/absent"), demo=False)
    assert time.monotonic() - t0 < 5
    assert "not in the local hub cache" in info.value.message
    loaded = load_snac(settings("voicegw-test/absent"), demo=True)
    assert loaded.random_weights and "unreachable" in loaded.warnings[0]


def test_hub_id_goes_through_from_pretrained_and_the_local_cache(
    snac_weights: Path, tmp_path: Path
) -> None:
    # from_pretrained finds the files in the cache with local_files_only, so nothing
    # touches the network.
    fill_hub_cache(tmp_path, "voicegw-test/snac-24khz", snac_weights)
    loaded = load_snac(
        settings("voicegw-test/snac-24khz"),
        demo=False,
        hub_kwargs={"cache_dir": str(tmp_path), "local_files_only": True},
    )
    assert loaded.source == "hub:voicegw-test/snac-24khz"
    assert not loaded.random_weights


def test_hub_id_not_in_cache_is_a_start_up_error_naming_the_cause(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="voicegw-test/absent") as info:
        load_snac(
            settings("voicegw-test/absent"),
            demo=False,
            hub_kwargs={"cache_dir": str(tmp_path), "local_files_only": True},
        )
    assert "local cache" in info.value.message
    assert info.value.code == "model_load_failed"


def test_directory_missing_weights_is_named(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(dict(SNAC_24KHZ_CONFIG)))
    with pytest.raises(ModelLoadError, match=r"lacks pytorch_model\.bin"):
        load_snac(settings(str(tmp_path)), demo=False)


def test_corrupt_weights_are_a_load_error(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(dict(SNAC_24KHZ_CONFIG)))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelLoadError, match="cannot load the SNAC model from"):
        load_snac(settings(str(tmp_path)), demo=False)


def test_a_path_that_does_not_exist_is_not_mistaken_for_a_hub_id() -> None:
    with pytest.raises(ModelLoadError, match="neither a directory"):
        load_snac(settings("/nonexistent/snac"), demo=False)


def test_demo_falls_back_to_random_weights_loudly(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="voicegw.decoder"):
        loaded = load_snac(settings("/nonexistent/snac"), demo=True)
    assert loaded.random_weights
    assert loaded.source == "random(seed=0)"
    assert "demo fallback" in loaded.warnings[0]
    assert "/nonexistent/snac" in loaded.warnings[0]
    assert "RANDOM WEIGHTS" in caplog.text


def test_random_is_explicit_seeded_and_warns(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="voicegw.decoder"):
        loaded = load_snac(settings("random"), demo=False)
    assert loaded.random_weights and not loaded.noise
    assert "RANDOM WEIGHTS" in caplog.text
    again = build_random_snac(seed=0)
    w = next(iter(prepare_for_inference(again).decoder.parameters()))
    assert torch.equal(next(iter(loaded.model.decoder.parameters())), w)


def test_device_and_dtype_errors_are_not_hidden_by_demo_mode() -> None:
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="no CUDA device"):
            load_snac(settings("random", device="cuda"), demo=True)
    for dtype in ("bfloat16", "float16", "tf32"):
        with pytest.raises(ModelLoadError, match="needs a CUDA device"):
            load_snac(settings("random", device="cpu", dtype=dtype), demo=True)


def test_only_the_24khz_layout_is_accepted() -> None:
    tiny = build_snac(
        encoder_dim=8,
        encoder_rates=[2, 2],
        decoder_dim=16,
        decoder_rates=[2, 2],
        vq_strides=[8, 4, 2, 1],
        attn_window_size=None,
    )
    with pytest.raises(ModelLoadError, match="not the 24 kHz model"):
        _check_24khz(tiny, "test")


def test_preparing_for_inference_keeps_the_output_bit_exact() -> None:
    stock = build_random_snac(seed=3)
    fast = prepare_for_inference(build_random_snac(seed=3))
    g = torch.Generator().manual_seed(1)
    codes = [torch.randint(0, 4096, (1, n * 6), generator=g) for n in (1, 2, 4)]
    with torch.inference_mode():
        assert torch.equal(stock.decode(codes), fast.decode(codes))


def test_analytic_receptive_field(snac_model: LoadedModel) -> None:
    # 10 latent steps (2.5 frames) each side: 3 context frames (12 steps) cover it.
    assert snac_model.receptive_field == (10, 10)
    assert receptive_field(snac_model.model.decoder) == (10, 10)
