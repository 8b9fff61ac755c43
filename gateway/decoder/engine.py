"""Batched SNAC window decode: chunk plans in, int16 PCM of the kept samples out.

The engine runs in the decode worker's thread only; it is synchronous and owns no
threads of its own.

Decode of one plan: the window's codes go through SNAC's quantizer to latents (4 steps a
frame); the decoder turns latents into 512 samples a step. Two cuts keep the work close
to the kept samples, and both are exact (every kept sample still sees everything it
depends on, so only float rounding differs, about 1e-7):

* The latents are cut to the kept span plus the decoder's receptive field, 10 latent
  steps each side (``snac_model.receptive_field``); 3 context frames are 12 steps.
* Layer by layer, each top-level decoder layer's output is cut to the positions that the
  kept samples still depend on. Context is needed mostly by the first, low-rate layers;
  the expensive high-rate layers at the end need only a few dozen samples of margin. So
  the costly part of the decoder runs on little more than the kept samples, and a
  window with 6 frames of context costs about as much as 9 frames, not 14 (measured: 40%
  less CPU than decoding the whole window).

Where the window has less context than needed (the true start or end of a segment, or a
deliberately short first-chunk right context) nothing is cut on that side, so the decoder
sees the same zero padding there as the whole-utterance decode (or as the plan intends).

Batching: plans with the same geometry (latent span length and kept range within it)
are stacked into one forward pass, so there is never padding to leak. How many are
stacked per pass is ``max_stack``: on GPU the whole group; on CPU one window per pass by
default, because stacking there makes every window *slower* (the activations outgrow the
caches: measured 22 ms per frame alone against 37 ms per frame in a stack of 16). Stacked
or not, results are the same: one pass per window is bit-identical to unbatched decode,
and stacked passes differ from it by at most 1 LSB in rare samples, because oneDNN/cuDNN
pick different GEMM kernels for different batch shapes (about 0.2% of samples, SNR > 100
dB).

Conversion: ``round(clip(y * 32767))`` to int16, no fades, no trims.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn

from gateway.core.chunker import ChunkPlan, ChunkPolicy, check_frame
from gateway.decoder.snac_model import (
    HOP,
    LATENTS_PER_FRAME,
    LoadedModel,
    conv_geometry,
    positional_ops,
)
from gateway.errors import DecoderError
from gateway.vocab import SAMPLES_PER_FRAME

_L1 = [1, 4]
_L2 = [2, 3, 5, 6]

Codes = TypeVar("Codes", np.ndarray, torch.Tensor)


def levels(frames: Codes) -> list[Codes]:
    """Frames ``[..., n, 7]`` to SNAC's three code levels, as ``frames_to_levels`` does:
    ``[f0]``, ``[f1, f4]``, ``[f2, f3, f5, f6]`` per frame, flattened along time."""
    lead = frames.shape[:-2]
    return [
        frames[..., 0],
        frames[..., _L1].reshape(*lead, -1),
        frames[..., _L2].reshape(*lead, -1),
    ]


def to_int16(audio: torch.Tensor) -> torch.Tensor:
    """Float audio in [-1, 1] to int16: scale, round half to even, clip. No fades, no trims."""
    return audio.float().mul(32767.0).round_().clamp_(-32768.0, 32767.0).to(torch.int16)


@dataclass(frozen=True, slots=True)
class _Op:
    """A layer that mixes time positions: kernel, dilation, padding, stride."""

    transposed: bool
    k: int
    d: int
    p: int
    s: int

    def needs(self, lo: int, hi: int) -> tuple[int, int]:
        """Input positions that output positions ``lo..hi`` (inclusive) depend on."""
        span = (self.k - 1) * self.d
        if self.transposed:
            return math.ceil((lo + self.p - span) / self.s), math.floor((hi + self.p) / self.s)
        return lo - self.p, hi - self.p + span


def _ops(layer: nn.Module) -> tuple[_Op, ...]:
    return tuple(
        _Op(isinstance(op, nn.ConvTranspose1d), *conv_geometry(op)) for op in positional_ops(layer)
    )


class SnacEngine:
    """Decodes chunk plans with a loaded SNAC model. Use from one thread at a time."""

    def __init__(
        self,
        loaded: LoadedModel,
        *,
        max_stack: int | None = None,
        trim: bool = True,
    ) -> None:
        self.loaded = loaded
        self._model = loaded.model
        self._device = loaded.torch_device
        self._cuda = self._device.type == "cuda"
        # See the module docstring: stacking pays on GPU and costs on CPU.
        self.max_stack = max_stack if max_stack is not None else (1024 if self._cuda else 1)
        if self.max_stack < 1:
            raise ValueError("max_stack must be >= 1")
        left, right = loaded.receptive_field
        self._ctx_left = left if trim else math.inf
        self._ctx_right = right if trim else math.inf
        # The decoder's top-level layers, for layer-by-layer cutting (SNAC's Decoder keeps
        # them in ``.model``; anything else is decoded whole).
        seq = getattr(self._model.decoder, "model", None)
        self._layers: list[nn.Module] = list(seq) if trim and isinstance(seq, nn.Sequential) else []
        self._layer_ops = [_ops(layer) for layer in self._layers]
        self._layer_stride = [
            math.prod(op.s for op in ops if op.transposed) for ops in self._layer_ops
        ]
        self._cuts: dict[tuple[int, int, int], tuple[tuple[int, int], ...]] = {}

    def latent_span(self, plan: ChunkPlan) -> tuple[int, int]:
        """The latent steps of the window that are decoded, relative to the window start."""
        n = plan.window_frames * LATENTS_PER_FRAME
        a = plan.left_context * LATENTS_PER_FRAME
        b = a + (plan.end - plan.start) * LATENTS_PER_FRAME
        lo = max(0, a - self._ctx_left)
        hi = min(n, b + self._ctx_right)
        return int(lo), int(hi)

    def _geometry(self, plan: ChunkPlan) -> tuple[int, int, int, int]:
        """(first latent step decoded, latent steps, kept samples start, end), the last two
        counted from the first decoded latent step."""
        lo, hi = self.latent_span(plan)
        off = lo * HOP
        return lo, hi - lo, plan.keep_start - off, plan.keep_end - off

    def group_key(self, plan: ChunkPlan) -> Hashable:
        """Plans with equal keys can be stacked into one forward pass."""
        return self._geometry(plan)[1:]

    def _layer_cuts(self, steps: int, k0: int, k1: int) -> tuple[tuple[int, int], ...]:
        """For each top-level layer, the output positions (inclusive) the kept samples
        ``k0..k1-1`` depend on, found by walking the layers backwards."""
        key = (steps, k0, k1)
        cuts = self._cuts.get(key)
        if cuts is None:
            need: list[tuple[int, int]] = []
            lo, hi = k0, k1 - 1
            for ops in reversed(self._layer_ops):
                need.append((lo, hi))
                for op in reversed(ops):
                    lo, hi = op.needs(lo, hi)
            cuts = tuple(reversed(need))
            self._cuts[key] = cuts
        return cuts

    def _run_decoder(self, z: torch.Tensor, k0: int, k1: int) -> torch.Tensor:
        """Decoder output for samples ``k0..k1-1`` of latents ``z``, cutting as it goes."""
        if not self._layers:
            y: torch.Tensor = self._model.decoder(z)
            return y[..., k0:k1]
        x = z
        off = 0  # position of x[..., 0] in the current layer's coordinates
        for layer, stride, (lo, hi) in zip(
            self._layers, self._layer_stride, self._layer_cuts(z.shape[-1], k0, k1), strict=True
        ):
            x = layer(x)
            off *= stride
            a = max(0, lo - off)
            b = min(x.shape[-1], hi + 1 - off)
            if a > 0 or b < x.shape[-1]:
                x = x[..., a:b]
                off += a
        if off != k0 or x.shape[-1] != k1 - k0:  # pragma: no cover - would be a geometry bug
            raise DecoderError(f"layer cuts kept {off}+{x.shape[-1]}, wanted {k0}..{k1}")
        return x

    def decode(self, plans: Sequence[ChunkPlan]) -> list[np.ndarray]:
        """Decode ``plans``; return each plan's kept samples as int16, in the given order."""
        out: dict[int, np.ndarray] = {}
        groups: dict[Hashable, list[int]] = {}
        for i, p in enumerate(plans):
            groups.setdefault(self.group_key(p), []).append(i)
        with torch.inference_mode():
            for idx in groups.values():
                for k in range(0, len(idx), self.max_stack):
                    part = idx[k : k + self.max_stack]
                    for i, pcm in zip(
                        part, self._decode_stack([plans[i] for i in part]), strict=True
                    ):
                        out[i] = pcm
        return [out[i] for i in range(len(plans))]

    def _decode_stack(self, plans: Sequence[ChunkPlan]) -> list[np.ndarray]:
        # Latents per window length, not per window: one host-to-device copy of the codes
        # and one quantizer pass for all the stack's windows of a length. Per window, that
        # was three copies (each a blocking copy that gives up the GIL and must win it back
        # from the event loop) and a dozen small kernels, which dominated a GPU pass.
        # Windows of different lengths still get their own quantizer pass, so a window's
        # latents never depend on what it is stacked with; on CPU (one window per pass)
        # this is exactly the single-window computation.
        by_len: dict[int, list[int]] = {}
        for i, p in enumerate(plans):
            by_len.setdefault(len(p.frames), []).append(i)
        parts: dict[int, torch.Tensor] = {}
        for idx in by_len.values():
            lat = self._latents(np.asarray([plans[i].frames for i in idx], dtype=np.int64))
            for row, i in enumerate(idx):
                lo, steps, _, _ = self._geometry(plans[i])
                parts[i] = lat[row : row + 1, :, lo : lo + steps]
        _, _, k0, k1 = self._geometry(plans[0])  # the same for the whole stack
        z = parts[0] if len(parts) == 1 else torch.cat([parts[i] for i in range(len(plans))], dim=0)
        audio = to_int16(self._run_decoder(z, k0, k1)).cpu().numpy()[:, 0, :]
        result = []
        for row, p in zip(audio, plans, strict=True):
            if row.shape[0] != p.samples:  # pragma: no cover - would be a planning bug
                raise DecoderError(f"chunk {p.index}: {row.shape[0]} samples, not {p.samples}")
            result.append(np.ascontiguousarray(row))
        return result

    def _latents(self, codes: np.ndarray) -> torch.Tensor:
        """Latents ``[B, C, steps]`` of code frames ``[B, n, 7]`` (one copy to the device)."""
        t = torch.from_numpy(codes).to(self._device)
        return self._model.quantizer.from_codes(levels(t))

    def warm_up(self, policy: ChunkPolicy, max_batch: int = 1) -> None:
        """Decode the window shapes a segment starts with, once, at start-up.

        The first pass for each shape pays for kernel selection and allocation (oneDNN
        primitives, cuDNN autotuning); doing it here keeps that out of the first request.
        """
        from gateway.core.chunker import Chunker

        ch = Chunker(policy)
        # Every shape of the ramp, then two full chunks (the first with a full left context).
        k, n = 0, 0
        while policy.size(k) < policy.chunk_frames:
            n += policy.size(k)
            k += 1
        n += 2 * policy.chunk_frames + 2 * policy.context_frames + 8
        rng = np.random.default_rng(0)
        codes = [tuple(int(c) for c in row) for row in rng.integers(0, 4096, (n, 7))]
        plans = ch.feed(codes)
        seen: set[Hashable] = set()
        for p in plans:
            key = self.group_key(p)
            if key in seen:
                continue
            seen.add(key)
            self.decode([p] * min(max_batch, self.max_stack))
        if self._cuda:
            torch.cuda.synchronize(self._device)


def decode_utterance(loaded: LoadedModel, frames: Sequence[Sequence[int]]) -> np.ndarray:
    """Whole-utterance decode of ``frames`` to int16 PCM: the reference for exactness.

    F frames give F * 2048 samples. Other components use it to check that a segment's
    streamed PCM equals the decode of the codes that were sent for it (with ``noise``
    off; a noisy model adds fresh noise on every call).
    """
    checked = [check_frame(f) for f in frames]
    if not checked:
        return np.zeros(0, dtype=np.int16)
    codes = torch.from_numpy(np.asarray(checked, dtype=np.int64)[None])
    with torch.inference_mode():
        lv = [c.to(loaded.torch_device) for c in levels(codes)]
        audio = loaded.model.decode(lv)
        pcm: np.ndarray = to_int16(audio).cpu().numpy()[0, 0]
    assert pcm.shape[0] == len(checked) * SAMPLES_PER_FRAME
    return pcm


def measure_receptive_field(
    loaded: LoadedModel, frames: int = 16, seed: int = 0
) -> tuple[int, int]:
    """Measure, in samples, how far one frame's codes reach before and after the frame.

    Decodes random codes twice, the second time with the middle frame's codes changed,
    and finds the first and last samples that differ (in float, before rounding).
    Requires a model without noise.
    """
    if loaded.noise:
        raise DecoderError("the receptive field cannot be measured on a model with noise")
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 4096, (frames, 7))
    b = a.copy()
    k = frames // 2
    b[k] = (b[k] + 1 + rng.integers(0, 4095, 7)) % 4096
    with torch.inference_mode():
        ya, yb = (
            loaded.model.decode(
                [c.to(loaded.torch_device) for c in levels(torch.from_numpy(x[None]))]
            )
            .float()
            .cpu()
            .numpy()[0, 0]
            for x in (a, b)
        )
    changed = np.flatnonzero(ya != yb)
    left = k * SAMPLES_PER_FRAME - int(changed[0])
    right = int(changed[-1]) - ((k + 1) * SAMPLES_PER_FRAME - 1)
    return left, right


def snr_db(reference: np.ndarray, test: np.ndarray) -> float:
    """Signal-to-noise ratio of ``test`` against ``reference`` (int16 arrays), in dB.

    Identical arrays give ``inf``.
    """
    ref = reference.astype(np.float64)
    err = test.astype(np.float64) - ref
    noise = float(np.sum(err * err))
    if noise == 0.0:
        return math.inf
    return 10.0 * math.log10(float(np.sum(ref * ref)) / noise)


def describe(loaded: LoadedModel) -> dict[str, Any]:
    """A JSON-friendly summary for health endpoints and logs."""
    return {
        "source": loaded.source,
        "device": loaded.device,
        "dtype": loaded.dtype,
        "random_weights": loaded.random_weights,
        "noise": loaded.noise,
        "receptive_field_latents": list(loaded.receptive_field),
    }
