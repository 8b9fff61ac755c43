"""Loading the SNAC 24 kHz decoder: hub id, local directory or seeded random weights.

``UpstreamSettings.snac_model`` takes three forms:

* a hub id such as ``hubertsiuzdak/snac_24khz``, loaded through the ``snac`` package's own
  ``SNAC.from_pretrained`` and so through the local Hugging Face cache;
* a local directory holding ``config.json`` and ``pytorch_model.bin`` (the layout
  :func:`write_random_weights` writes);
* ``random``: the 24 kHz architecture with seeded random weights, for demos and tests. It
  produces noise, not speech, and says so loudly.

In production a model that cannot be loaded is a start-up error (:class:`ModelLoadError`)
that names the cause. Only demo mode falls back to ``random``, with a loud warning.

Loading also prepares the model for inference, without changing its output:
weight-norm parametrisations are baked into plain weights (otherwise every forward pass
recomputes every weight: about a quarter of the CPU time of a small window), and Snake
activations are evaluated with fewer temporaries (``FastSnake``, bit-identical in float32).

Receptive field. The decoder (no attention in the 24 kHz model) is a stack of "same"
convolutions and transposed convolutions, so every output sample depends on a bounded
span of latent steps (4 per frame, 512 samples each). :func:`receptive_field` walks the
layers to find it: 10 latent steps to the left and 9 to the right of a kept span, i.e.
at most 2.5 frames. Measured by perturbing one frame's codes (``measure_receptive_field``
in ``gateway.decoder.engine``), a frame's codes change samples up to 4754 samples (2.32
frames) before its start and 4756 samples after its end. Hence the default of 3 context
frames: decoding with ±3 frames equals the whole-utterance decode to float precision.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import socket
import urllib.parse
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from gateway.config import UpstreamSettings
from gateway.errors import ModelLoadError

with warnings.catch_warnings():
    # snac decorates its Snake activation with torch.jit.script at import time, which
    # torch >= 2.9 deprecates. Nothing here can change that; the decorated function is
    # not used after prepare_for_inference anyway (FastSnake replaces it).
    warnings.filterwarnings(
        "ignore", message=r".*torch\.jit\.script.*", category=DeprecationWarning
    )
    from snac import SNAC
    from snac.layers import Snake1d

log = logging.getLogger("voicegw.decoder")

DEFAULT_HUB_ID = "hubertsiuzdak/snac_24khz"
RANDOM = "random"
WEIGHTS_FILE = "pytorch_model.bin"
CONFIG_FILE = "config.json"

SNAC_24KHZ_CONFIG: Mapping[str, Any] = MappingProxyType(
    {
        "sampling_rate": 24000,
        "encoder_dim": 48,
        "encoder_rates": [2, 4, 8, 8],
        "decoder_dim": 1024,
        "decoder_rates": [8, 8, 4, 2],
        "attn_window_size": None,
        "codebook_size": 4096,
        "codebook_dim": 8,
        "vq_strides": [4, 2, 1],
        "noise": True,
        "depthwise": True,
    }
)
"""The published ``hubertsiuzdak/snac_24khz`` config.json."""

HOP = 512
"""Output samples per latent step of the 24 kHz model."""
LATENTS_PER_FRAME = 4
"""Latent steps per Orpheus frame: level 2 has 4 codes a frame at stride 1."""

_DTYPES = {
    "float32": torch.float32,
    # float32 storage, TF32 tensor-core math for convolutions and matmuls (CUDA only).
    "tf32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
_HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")
_RANDOM_BANNER = "!" * 72


@dataclass(frozen=True, slots=True)
class LoadedModel:
    """A SNAC model ready for inference, and where it came from."""

    model: SNAC
    """The ``snac.SNAC`` module, prepared (eval, baked weight norm) and on its device."""
    device: str
    dtype: str
    source: str
    """``hub:<id>``, ``dir:<path>`` or ``random(seed=N)``."""
    random_weights: bool
    noise: bool
    """The model adds random noise in its decoder; its output is then not reproducible."""
    receptive_field: tuple[int, int]
    """(left, right) latent steps an output latent step depends on."""
    warnings: tuple[str, ...] = field(default=())

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]


class FastSnake(nn.Module):
    """``snake(x) = x + sin(alpha * x)**2 / (alpha + 1e-9)`` with one temporary, not five.

    Snake runs on every activation at the full output rate, so its memory traffic is a
    large share of CPU decode time. The arithmetic is the same as ``snac.layers.snake``,
    in the same order, so float32 results are bit-identical.
    """

    alpha: torch.Tensor
    inv_alpha: torch.Tensor

    def __init__(self, alpha: torch.Tensor) -> None:
        super().__init__()
        a = alpha.detach().clone()
        self.register_buffer("alpha", a)
        self.register_buffer("inv_alpha", (a + 1e-9).reciprocal())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.mul(x, self.alpha)
        s.sin_()
        s.mul_(s)
        return torch.addcmul(x, s, self.inv_alpha, out=s)


def build_snac(config: Mapping[str, Any] = SNAC_24KHZ_CONFIG, **overrides: Any) -> SNAC:
    """The SNAC module for ``config`` with ``overrides``, untrained."""
    return SNAC(**{**config, **overrides})


def build_random_snac(seed: int = 0, noise: bool = False) -> SNAC:
    """The 24 kHz architecture with weights drawn from ``seed``; the global RNG is untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_snac(noise=noise)
    return model.eval()


def write_random_weights(
    directory: str | os.PathLike[str], seed: int = 0, noise: bool = False
) -> Path:
    """Write a loadable SNAC directory (``config.json`` + ``pytorch_model.bin``, ~80 MB).

    Used by tests, benchmarks and the demo instead of downloading weights. A directory
    already written with the same seed and noise flag is reused as it is.
    """
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    config = {**SNAC_24KHZ_CONFIG, "noise": noise}
    marker = path / "voicegw_random.json"
    stamp = {"seed": seed, "noise": noise}
    if (path / WEIGHTS_FILE).exists() and marker.exists():
        try:
            if json.loads(marker.read_text()) == stamp:
                return path
        except (OSError, ValueError):
            pass
    model = build_random_snac(seed=seed, noise=noise)
    tmp = path / (WEIGHTS_FILE + ".tmp")
    torch.save(model.state_dict(), tmp)
    # Write, then rename: a half-written file is never mistaken for a finished one.
    tmp.replace(path / WEIGHTS_FILE)
    (path / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    marker.write_text(json.dumps(stamp) + "\n")
    return path


def resolve_device(name: str) -> str:
    """``auto`` picks CUDA when torch sees a GPU, else CPU. An unusable choice raises."""
    name = name.strip().lower()
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ModelLoadError(
                f"vllm.snac_device is {name!r} but torch sees no CUDA device "
                f"(torch {torch.__version__}); use 'cpu' or 'auto'"
            )
        return name
    raise ModelLoadError(f"vllm.snac_device {name!r} is not one of auto, cpu, cuda[:N]")


def resolve_dtype(name: str, device: str) -> str:
    if name not in _DTYPES:
        raise ModelLoadError(f"vllm.snac_dtype {name!r} is not one of {', '.join(_DTYPES)}")
    if name != "float32" and not device.startswith("cuda"):
        raise ModelLoadError(
            f"vllm.snac_dtype {name!r} needs a CUDA device, but the decoder runs on {device!r}; "
            "use float32 on CPU"
        )
    return name


def prepare_for_inference(model: SNAC) -> SNAC:
    """Eval mode, no grads, weight norm baked into plain weights, fast Snake. Same output."""
    model.eval()
    model.requires_grad_(False)
    for module in model.modules():
        # parametrize.is_parametrized makes the same test, but does not narrow the type.
        params = getattr(module, "parametrizations", None)
        if isinstance(params, nn.ModuleDict):
            for name in list(params.keys()):
                parametrize.remove_parametrizations(module, name, leave_parametrized=True)
    _swap_snake(model)
    return model


def _swap_snake(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, Snake1d):
            setattr(module, name, FastSnake(child.alpha))
        else:
            _swap_snake(child)


Conv = nn.Conv1d | nn.ConvTranspose1d
"""A layer that mixes time positions."""


def positional_ops(module: nn.Module) -> Iterator[Conv]:
    """The layers that mix time positions, in forward order (children are registered in
    forward order throughout SNAC's decoder; residual branches are supersets of their
    identity paths, so following the branch is enough)."""
    if isinstance(module, Conv):
        yield module
        return
    for child in module.children():
        yield from positional_ops(child)


def conv_geometry(op: Conv) -> tuple[int, int, int, int]:
    """(kernel, dilation, padding, stride) of a 1-D convolution with explicit padding."""
    if isinstance(op.padding, str):  # pragma: no cover - not in SNAC's decoder
        raise ValueError(f"padding={op.padding!r} is not supported")
    return op.kernel_size[0], op.dilation[0], op.padding[0], op.stride[0]


def receptive_field(decoder: nn.Module, hop: int = HOP) -> tuple[int, int]:
    """(left, right) latent steps that the ``hop`` samples of one latent step depend on.

    Walks the decoder from its output back to its input, mapping a span of positions
    through each layer: a stride-1 convolution widens it by its padding on the left and
    ``(k - 1) * d - p`` on the right; a transposed convolution maps output positions to
    the inputs that overlap them.
    """
    j = 1000  # any latent step far from the edges; the decoder is shift-invariant
    lo, hi = j * hop, (j + 1) * hop - 1
    for op in reversed(list(positional_ops(decoder))):
        k, d, p, s = conv_geometry(op)
        if isinstance(op, nn.ConvTranspose1d):
            span = (k - 1) * d
            lo, hi = math.ceil((lo + p - span) / s), math.floor((hi + p) / s)
        else:
            if s != 1:  # pragma: no cover - not in SNAC's decoder
                raise ValueError("strided convolutions are not supported")
            lo, hi = lo - p, hi - p + (k - 1) * d
    return j - lo, hi - j


def _check_24khz(model: SNAC, source: str) -> None:
    # The codec's frame layout (7 codes over levels of 1, 2 and 4 codes a frame, 2048
    # samples a frame) only fits the 24 kHz model; anything else would decode to garbage.
    hop = int(math.prod(model.decoder_rates))
    if list(model.vq_strides) != [4, 2, 1] or hop != HOP or model.codebook_size != 4096:
        raise ModelLoadError(
            f"SNAC model from {source} is not the 24 kHz model Orpheus uses: "
            f"vq_strides={list(model.vq_strides)}, hop={hop}, "
            f"codebook_size={model.codebook_size} (expected [4, 2, 1], 512, 4096)"
        )
    if model.attn_window_size is not None:
        raise ModelLoadError(
            f"SNAC model from {source} uses local attention (attn_window_size="
            f"{model.attn_window_size}); the streaming decoder needs the 24 kHz model's "
            "attention-free decoder"
        )


def _load_dir(path: Path) -> SNAC:
    missing = [n for n in (CONFIG_FILE, WEIGHTS_FILE) if not (path / n).is_file()]
    if missing:
        raise ModelLoadError(f"SNAC model directory {str(path)!r} lacks {', '.join(missing)}")
    try:
        model: SNAC = SNAC.from_pretrained(str(path))
        return model
    except Exception as exc:
        raise ModelLoadError(
            f"cannot load the SNAC model from {str(path)!r}: {type(exc).__name__}: {exc}"
        ) from exc


def _hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the hub cannot be reached, or None if a TCP connection to it opens.

    huggingface_hub retries a failing HEAD request five times with backoff (about 25 s
    when DNS fails); a start-up that is going to fail anyway should say so at once.
    """
    from huggingface_hub import constants

    url = urllib.parse.urlsplit(constants.ENDPOINT)
    host = url.hostname or "huggingface.co"
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as exc:
        return f"{host}:{port} is unreachable ({exc})"


def _load_hub(repo_id: str, hub_kwargs: Mapping[str, Any]) -> SNAC:
    try:
        if not hub_kwargs:
            # The local hub cache first: no network round trip when the model is there.
            try:
                cached: SNAC = SNAC.from_pretrained(repo_id, local_files_only=True)
                return cached
            except Exception as exc:
                if os.environ.get("HF_HUB_OFFLINE", "").strip() in ("1", "true", "yes"):
                    raise ModelLoadError(
                        f"{repo_id!r} is not in the local hub cache and HF_HUB_OFFLINE is set"
                    ) from exc
            why = _hub_unreachable()
            if why is not None:
                raise ModelLoadError(
                    f"cannot load the SNAC model {repo_id!r}: it is not in the local hub "
                    f"cache and the hub {why}. Download it once where the hub is reachable, "
                    "or set vllm.snac_model to a directory with config.json and "
                    "pytorch_model.bin"
                )
        model: SNAC = SNAC.from_pretrained(repo_id, **hub_kwargs)
        return model
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(
            f"cannot load the SNAC model {repo_id!r} from the Hugging Face hub or its local "
            f"cache: {type(exc).__name__}: {exc}. Download it once where the hub is reachable, "
            "or set vllm.snac_model to a directory with config.json and pytorch_model.bin"
        ) from exc


def _random_warning(why: str) -> str:
    return (
        f"SNAC decoder uses RANDOM WEIGHTS ({why}): every voice will sound like noise. "
        "This is for demos and tests only."
    )


def load_snac(
    settings: UpstreamSettings,
    *,
    demo: bool,
    seed: int = 0,
    hub_kwargs: Mapping[str, Any] | None = None,
) -> LoadedModel:
    """Load, prepare and place the SNAC decoder that ``settings`` names.

    ``settings`` names the model (``snac_model``, ``snac_device``, ``snac_dtype``).
    ``hub_kwargs`` pass through to ``hf_hub_download`` (e.g.
    ``cache_dir``, ``local_files_only``). Raises :class:`ModelLoadError` naming the cause;
    with ``demo`` a model that cannot be loaded is replaced by random weights instead.
    Warm-up is separate (``SnacEngine.warm_up``, run by the decode worker at start).
    """
    spec = str(settings.snac_model).strip()
    device = resolve_device(settings.snac_device)
    dtype = resolve_dtype(settings.snac_dtype, device)
    warnings: list[str] = []
    random_weights = False
    if spec.lower() == RANDOM:
        model = build_random_snac(seed=seed, noise=False)
        source = f"random(seed={seed})"
        random_weights = True
        warnings.append(_random_warning("vllm.snac_model is 'random'"))
    else:
        try:
            path = Path(spec).expanduser()
            if path.is_dir():
                model, source = _load_dir(path), f"dir:{path}"
            elif spec.startswith(("/", ".", "~")) or not _HUB_ID.fullmatch(spec):
                raise ModelLoadError(
                    f"vllm.snac_model {spec!r} is neither a directory nor a hub id "
                    "(org/name) nor 'random'"
                )
            else:
                model, source = _load_hub(spec, hub_kwargs or {}), f"hub:{spec}"
            _check_24khz(model, source)
        except ModelLoadError as exc:
            if not demo:
                raise
            # Demo mode only: keep the demo running, with noise-free random weights so that
            # its output stays reproducible, and say so as loudly as we can.
            model = build_random_snac(seed=seed, noise=False)
            source = f"random(seed={seed})"
            random_weights = True
            warnings.append(_random_warning(f"demo fallback: {exc.message}"))
    for w in warnings:
        log.warning("%s\n%s\n%s", _RANDOM_BANNER, w, _RANDOM_BANNER)
    noise = any(type(m).__name__ == "NoiseBlock" for m in model.modules())
    prepare_for_inference(model)
    if device.startswith("cuda"):
        # PyTorch lets cuDNN use TF32 for float32 convolutions by default, which breaks
        # exactness at large batches (docs/design.md, D7): float32 means true float32 here,
        # and TF32 is its own choice. These switches are process-wide; the gateway process
        # runs one decoder.
        tf32 = dtype == "tf32"
        torch.backends.cudnn.allow_tf32 = tf32
        torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        model.to(device=torch.device(device), dtype=_DTYPES[dtype])
    except Exception as exc:
        raise ModelLoadError(
            f"cannot move the SNAC model to {device} as {dtype}: {type(exc).__name__}: {exc}"
        ) from exc
    return LoadedModel(
        model=model,
        device=device,
        dtype=dtype,
        source=source,
        random_weights=random_weights,
        noise=noise,
        receptive_field=receptive_field(model.decoder),
        warnings=tuple(warnings),
    )
