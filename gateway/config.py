"""Frozen, validated settings built from a YAML file, then ``VOICEGW_*`` env vars, then CLI flags.

The TTS upstream section keeps exactly the shape of the seed deployment's ``sound.yaml``
(``sounds.vllm``), so an existing file loads unchanged; the newer split layout's
``tts_providers.vllm`` is accepted too. Gateway-only keys live under ``gateway``.

Every leaf is declared once, as a dataclass field with optional ``metadata`` bounds; the
generic builder below converts, range-checks and reports errors naming the key, the value
and what is allowed. An unknown key in a file is a warning (a shared file may hold keys for
other tools); on the command line or in a ``VOICEGW_*`` env var it is an error with a
"did you mean" suggestion, because there it can only be a typo.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import yaml

from gateway.core.tokens import VOICES
from gateway.errors import ConfigError

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

_T = TypeVar("_T")
_D = TypeVar("_D", bound="DataclassInstance")

ENV_PREFIX = "VOICEGW_"
CONFIG_ENV = "VOICEGW_CONFIG"


def _f(
    default: _T,
    *,
    lo: float | None = None,
    hi: float | None = None,
    choices: tuple[str, ...] | None = None,
    pattern: str | None = None,
    doc: str = "",
) -> _T:
    meta = {"lo": lo, "hi": hi, "choices": choices, "pattern": pattern, "doc": doc}
    if isinstance(default, (list, dict, tuple)) and not isinstance(default, tuple):
        raise TypeError("use tuples or mappings via default_factory")
    return field(default=default, metadata=meta)


def _fm(factory: Callable[[], _T], doc: str = "") -> _T:
    return field(default_factory=factory, metadata={"doc": doc})


@dataclass(frozen=True, slots=True)
class Endpoint:
    host: str = _f("127.0.0.1", doc="vLLM host")
    port: int = _f(8000, lo=1, hi=65535, doc="vLLM port")
    scheme: str = _f("http", choices=("http", "https"))

    @property
    def base_url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class TimeoutSettings:
    """All in milliseconds, like the seed's ``timeout.{connect,total}``."""

    connect: int = _f(15_000, lo=1, hi=600_000, doc="TCP connect timeout (ms)")
    total: int = _f(120_000, lo=1, hi=3_600_000, doc="whole request, all tokens (ms)")
    first_token: int = _f(15_000, lo=1, hi=600_000, doc="request sent to first token (ms)")
    idle: int = _f(10_000, lo=1, hi=600_000, doc="longest gap between tokens (ms)")


@dataclass(frozen=True, slots=True)
class RetrySettings:
    enabled: bool = _f(True, doc="retry transient failures before audio was sent")
    max_retries: int = _f(3, lo=0, hi=20, doc="retries per segment")
    initial_wait_ms: int = _f(1000, lo=0, hi=600_000, doc="first backoff (ms), with jitter")
    max_wait_ms: int = _f(30_000, lo=0, hi=3_600_000, doc="backoff ceiling (ms)")
    exponential_base: float = _f(2.0, lo=1.0, hi=10.0, doc="backoff growth per retry")


@dataclass(frozen=True, slots=True)
class UpstreamSettings:
    """``sounds.vllm`` (or ``tts_providers.vllm``): the Orpheus-on-vLLM upstream and decoder."""

    host: str = _f("127.0.0.1", doc="vLLM host (single-endpoint form)")
    port: int = _f(8000, lo=1, hi=65535, doc="vLLM port (single-endpoint form)")
    scheme: str = _f("http", choices=("http", "https"), doc="http or https")
    endpoints: tuple[Endpoint, ...] = _f((), doc="several vLLM replicas; overrides host/port")
    tts_model: str = _f("canopylabs/orpheus-3b-0.1-ft", doc="served model name")
    tts_voice: str = _f("tara", choices=VOICES, doc="default voice")
    temperature: float = _f(0.6, lo=0.0, hi=2.0, doc="sampling temperature")
    top_p: float = _f(0.95, lo=0.01, hi=1.0, doc="nucleus sampling")
    max_tokens: int = _f(1200, lo=7, hi=32_768, doc="audio tokens per segment (1200 = 14.6 s)")
    repetition_penalty: float = _f(1.1, lo=0.5, hi=3.0, doc="Orpheus needs >= 1.1")
    max_concurrent_requests: int = _f(4, lo=1, hi=4096, doc="per upstream; match --max-num-seqs")
    request_queue_size: int = _f(10, lo=0, hi=100_000, doc="bounded wait queue per upstream")
    timeout: TimeoutSettings = _fm(TimeoutSettings)
    retry: RetrySettings = _fm(RetrySettings)
    api_key_env: str = _f("", doc="name of the env var holding the vLLM API key")
    extra_body: Mapping[str, Any] = _fm(dict, doc="passed through into every request body")
    eject_after_failures: int = _f(3, lo=1, hi=1000, doc="consecutive failures before ejection")
    eject_cooldown_ms: int = _f(10_000, lo=100, hi=3_600_000, doc="ejected endpoint rest (ms)")
    snac_model: str = _f("hubertsiuzdak/snac_24khz", doc="hub id, local dir, or 'random'")
    snac_device: str = _f("auto", pattern=r"auto|cpu|cuda(:\d+)?", doc="auto, cpu or cuda[:N]")
    snac_dtype: str = _f(
        "float32",
        choices=("float32", "tf32", "float16", "bfloat16"),
        doc="tf32/fp16/bf16 on CUDA only (float32 is strict: no TF32)",
    )

    @property
    def endpoint_list(self) -> tuple[Endpoint, ...]:
        if self.endpoints:
            return self.endpoints
        return (Endpoint(host=self.host, port=self.port, scheme=self.scheme),)


@dataclass(frozen=True, slots=True)
class ServerSettings:
    host: str = _f("127.0.0.1", doc="listen address")
    port: int = _f(8080, lo=0, hi=65535, doc="listen port")
    log_level: str = _f("info", choices=("debug", "info", "warning", "error"), doc="log level")
    request_timeout_ms: int = _f(
        10_000, lo=100, hi=600_000, doc="request line+headers, and a body, must arrive within"
    )
    keep_alive_timeout_ms: int = _f(5_000, lo=100, hi=600_000, doc="idle kept-alive connection")
    shutdown_timeout_ms: int = _f(
        5_000, lo=0, hi=600_000, doc="at shutdown, then running sessions are cancelled"
    )
    drain_timeout_ms: int = _f(
        20_000, lo=0, hi=3_600_000, doc="on SIGTERM, live turns may finish within; then 1001"
    )
    workers: int = _f(
        1, lo=0, hi=256, doc="worker processes on the one port; 0 = one per usable CPU core"
    )


@dataclass(frozen=True, slots=True)
class SegmenterSettings:
    fast_first: bool = _f(True, doc="first segment of a turn may end at a clause boundary")
    first_clause_min_chars: int = _f(20, lo=1, hi=1000, doc="fast first segment minimum")
    min_chars: int = _f(40, lo=0, hi=2000, doc="later short sentences merge up to this")
    max_chars: int = _f(180, lo=20, hi=4000, doc="longer sentences split at clauses/words")
    idle_flush_ms: int = _f(800, lo=0, hi=600_000, doc="release stalled text; 0 disables")
    normalize: bool = _f(True, doc="strip markdown, code blocks and emoji")


@dataclass(frozen=True, slots=True)
class DecoderSettings:
    context_frames: int = _f(3, lo=0, hi=16, doc="left/right context frames per chunk")
    first_chunk_frames: int = _f(1, lo=1, hi=64, doc="frames in a segment's first chunk")
    chunk_frames: int = _f(8, lo=1, hi=256, doc="frames in later chunks")
    first_chunk_right_context: int = _f(
        2, lo=-1, hi=16, doc="right context of the first chunk (97 dB); -1 = context_frames"
    )
    ramp_speed: float = _f(
        1.2, lo=1.01, hi=100.0, doc="upstream speed (x real time) assumed until measured"
    )
    ramp_slack_frames: float = _f(
        1.5, lo=0.0, hi=16.0, doc="frame times each chunk keeps for decode and delivery"
    )
    max_batch: int = _f(16, lo=1, hi=1024, doc="windows per batched decode")
    max_wait_ms: float = _f(2.0, lo=0.0, hi=1000.0, doc="gather time for a batch")
    queue_size: int = _f(4096, lo=1, hi=1_000_000, doc="pending decode jobs, all sessions")
    threads: int = _f(0, lo=0, hi=256, doc="torch intra-op threads; 0 = torch default")
    urgent_hold_ms: float = _f(
        150.0, lo=0.0, hi=1000.0, doc="CPU: far-ahead windows wait this long after urgent ones"
    )
    decode_ahead_ms: float = _f(
        1000.0,
        lo=0.0,
        hi=600000.0,
        doc="CPU: WebSocket audio is decoded at most this far ahead of playback; 0 = no limit",
    )
    unpaced_patience: int = _f(
        4,
        lo=0,
        hi=1000,
        doc="under overload: decode passes WebSocket audio may take in a row while late "
        "/v1/audio/speech audio waits; 0 = no precedence, late streams take turns alike",
    )
    switch_interval_ms: float = _f(
        1.0, lo=0.0, hi=100.0, doc="GIL switch interval of `voicegw serve` (ms); 0 = Python's 5"
    )
    kernel_cache: int = _f(
        1024,
        lo=0,
        hi=1_000_000,
        doc="CPU: oneDNN kernels cached (per layer and window length, ~0.2 MB each); "
        "the environment's ONEDNN_PRIMITIVE_CACHE_CAPACITY wins",
    )
    release_idle_ms: float = _f(
        1000.0,
        lo=0.0,
        hi=3_600_000.0,
        doc="idle time after which the decode thread returns freed memory to the OS; 0 = never",
    )


@dataclass(frozen=True, slots=True)
class LimitsSettings:
    max_sessions: int = _f(256, lo=1, hi=100_000, doc="concurrent sessions (close 1013)")
    max_sessions_per_key: int = _f(32, lo=1, hi=100_000, doc="per API key")
    max_frame_bytes: int = _f(65_536, lo=256, hi=16 * 1024 * 1024, doc="client frame size")
    max_turn_chars: int = _f(20_000, lo=1, hi=10_000_000, doc="text per turn")
    # 1 MiB holds max_turn_chars of the worst JSON escaping (6 bytes a char) many times over.
    max_body_bytes: int = _f(
        1 << 20, lo=1024, hi=1 << 30, doc="HTTP request body (413 beyond, before it is read)"
    )
    max_inflight_segments: int = _f(3, lo=1, hi=64, doc="parallel requests per session")
    segments_per_minute: int = _f(240, lo=1, hi=100_000, doc="per session")
    reorder_buffer_bytes: int = _f(
        16 * 1024 * 1024, lo=65_536, hi=1 << 31, doc="audio held for later segments"
    )
    outbound_queue_bytes: int = _f(
        4 * 1024 * 1024, lo=65_536, hi=1 << 31, doc="unsent frames before 4008 slow_client"
    )
    slow_client_timeout_ms: int = _f(10_000, lo=100, hi=600_000, doc="longest blocked send")
    capacity: int = _f(
        0, lo=0, hi=100_000, doc="sessions sustainable per process; 0 = from the measured decoder"
    )
    capacity_utilisation: float = _f(
        0.7, lo=0.05, hi=1.0, doc="share of the decoder admitted sessions may use at steady rate"
    )
    capacity_late_windows: int = _f(
        3, lo=0, hi=100_000, doc="late live decode windows that stop admissions; 0 = never"
    )
    capacity_hold_ms: int = _f(
        5_000, lo=0, hi=600_000, doc="late windows count over this period (ms)"
    )
    speech_reserve: int = _f(
        1, lo=0, hi=100_000, doc="slots /v1/audio/speech leaves to live sessions"
    )
    admission_wait_ms: int = _f(
        0, lo=0, hi=600_000, doc="a WebSocket at capacity waits this long for a slot (FIFO)"
    )
    idle_timeout_ms: int = _f(
        300_000, lo=0, hi=86_400_000, doc="close an idle WebSocket (1000 idle_timeout); 0 = never"
    )


@dataclass(frozen=True, slots=True)
class AuthSettings:
    api_keys: tuple[str, ...] = _f((), doc="accepted keys; empty and no env = no auth")
    api_keys_env: str = _f("VOICEGW_API_KEYS", doc="env var with comma-separated keys")
    allowed_origins: tuple[str, ...] = _f((), doc="WebSocket Origin allowlist; empty = same host")


@dataclass(frozen=True, slots=True)
class LLMSettings:
    base_url: str = _f("", doc="OpenAI-compatible chat API base URL, e.g. http://host/v1")
    model: str = _f("", doc="chat model name")
    api_key_env: str = _f("", doc="env var holding the chat API key")
    system_prompt: str = _f(
        "You are a friendly voice assistant. Answer in a few short spoken sentences, "
        "without markdown.",
        doc="system message",
    )
    temperature: float = _f(0.7, lo=0.0, hi=2.0, doc="chat sampling temperature")
    max_tokens: int = _f(512, lo=1, hi=32_768, doc="reply length cap")
    max_history_messages: int = _f(40, lo=2, hi=10_000, doc="history kept per session")


@dataclass(frozen=True, slots=True)
class GatewaySettings:
    server: ServerSettings = _fm(ServerSettings)
    segmenter: SegmenterSettings = _fm(SegmenterSettings)
    decoder: DecoderSettings = _fm(DecoderSettings)
    limits: LimitsSettings = _fm(LimitsSettings)
    auth: AuthSettings = _fm(AuthSettings)
    llm: LLMSettings = _fm(LLMSettings)
    demo: bool = _f(False, doc="run the fake vLLM and allow random SNAC weights")


@dataclass(frozen=True, slots=True)
class Settings:
    vllm: UpstreamSettings = _fm(UpstreamSettings)
    gateway: GatewaySettings = _fm(GatewaySettings)
    source: str = "defaults"
    warnings: tuple[str, ...] = ()

    def api_keys(self, env: Mapping[str, str] | None = None) -> tuple[str, ...]:
        """Configured keys plus those in the env var; read lazily so keys never sit in logs."""
        env = os.environ if env is None else env
        keys = list(self.gateway.auth.api_keys)
        raw = env.get(self.gateway.auth.api_keys_env, "") if self.gateway.auth.api_keys_env else ""
        keys.extend(k.strip() for k in raw.split(",") if k.strip())
        return tuple(dict.fromkeys(keys))


# --------------------------------------------------------------------------------------
# Building

_GATEWAY_SECTIONS = {f.name for f in dataclasses.fields(GatewaySettings)}


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _describe(meta: Mapping[str, Any], tp: Any) -> str:
    if meta.get("choices"):
        return "one of " + ", ".join(meta["choices"])
    if meta.get("pattern"):
        return f"a value matching {meta['pattern']}"
    lo, hi = meta.get("lo"), meta.get("hi")
    name = getattr(tp, "__name__", str(tp))
    if lo is not None and hi is not None:
        return f"{'an integer' if tp is int else 'a number'} from {lo} to {hi}"
    return f"a {name}"


def _convert(value: Any, tp: Any, meta: Mapping[str, Any], path: str, warnings: list[str]) -> Any:
    origin = typing.get_origin(tp)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return _build(tp, value, path, warnings)
    if origin is tuple:
        (item_tp, _ellipsis) = typing.get_args(tp)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        return tuple(
            _convert(v, item_tp, {}, f"{path}[{i}]", warnings) for i, v in enumerate(value)
        )
    if origin in (Mapping, dict) or tp is Mapping:
        if value is None:
            return types.MappingProxyType({})
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return types.MappingProxyType(dict(value))
    allowed = _describe(meta, tp)
    if tp is bool:
        if isinstance(value, bool):
            out: Any = value
        elif isinstance(value, str) and value.lower() in {"true", "1", "yes", "on"}:
            out = True
        elif isinstance(value, str) and value.lower() in {"false", "0", "no", "off"}:
            out = False
        else:
            raise ConfigError(f"{path}: {value!r} is not allowed; expected true or false")
    elif tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str, float)):
            raise ConfigError(f"{path}: {value!r} is not allowed; expected {allowed}")
        try:
            out = int(value) if not isinstance(value, float) or value.is_integer() else None
        except ValueError:
            out = None
        if out is None:
            raise ConfigError(f"{path}: {value!r} is not allowed; expected {allowed}")
    elif tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{path}: {value!r} is not allowed; expected {allowed}")
        try:
            out = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{path}: {value!r} is not allowed; expected {allowed}") from None
        if out != out:  # NaN passes every range check otherwise
            raise ConfigError(f"{path}: {value!r} is not allowed; expected {allowed}")
    elif tp is str:
        if value is None:
            value = ""
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{path}: {value!r} is not allowed; expected a string")
        out = str(value)
    else:  # pragma: no cover - a programming error in the schema
        raise TypeError(f"unsupported config type {tp!r} at {path}")
    lo, hi = meta.get("lo"), meta.get("hi")
    if (lo is not None and out < lo) or (hi is not None and out > hi):
        raise ConfigError(f"{path}: {value!r} is not allowed; expected {allowed}")
    choices = meta.get("choices")
    if choices and out not in choices:
        raise ConfigError(f"{path}: {value!r} is not allowed; expected {allowed}")
    pattern = meta.get("pattern")
    if pattern and not re.fullmatch(pattern, out):
        raise ConfigError(f"{path}: {value!r} is not allowed; expected {allowed}")
    return out


def _build(cls: type[_D], data: Mapping[str, Any], path: str, warnings: list[str]) -> _D:
    hints = _hints(cls)
    names = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        f = names.get(str(key))
        sub = f"{path}.{key}" if path else str(key)
        if f is None:
            warnings.append(f"unknown config key {sub!r} ignored")
            continue
        kwargs[f.name] = _convert(value, hints[f.name], f.metadata, sub, warnings)
    return cls(**kwargs)


def _set_path(tree: dict[str, Any], path: list[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        nxt = node.get(part)
        if not isinstance(nxt, dict):
            nxt = {}
            node[part] = nxt
        node = nxt
    node[path[-1]] = value


def _canonical_path(dotted: str) -> list[str]:
    """Accept ``vllm.port``, ``sounds.vllm.port``, ``gateway.server.port`` and ``server.port``."""
    parts = [p for p in re.split(r"\.|__", dotted.strip().lower()) if p]
    if not parts:
        raise ConfigError(f"empty config key {dotted!r}")
    if parts[0] in ("sounds", "tts_providers") and len(parts) > 1 and parts[1] == "vllm":
        parts = parts[1:]
    if parts[0] in _GATEWAY_SECTIONS:
        parts = ["gateway", *parts]
    return parts


def _leaf_paths(cls: type | None = None, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Canonical paths of every settings leaf, e.g. ``("gateway", "server", "port")``."""
    cls = Settings if cls is None else cls
    hints = _hints(cls)
    out: list[tuple[str, ...]] = []
    for f in dataclasses.fields(cls):
        if not f.init or f.name in ("source", "warnings"):
            continue
        if dataclasses.is_dataclass(hints[f.name]):
            out.extend(_leaf_paths(hints[f.name], (*prefix, f.name)))
        else:
            out.append((*prefix, f.name))
    return out


def _check_known(
    parts: list[str], spelt: str, origin: str, short: Callable[[tuple[str, ...]], str]
) -> None:
    """Refuse an unknown key from the command line or the environment, naming the nearest
    known one in the same spelling (``short`` turns a canonical path into it)."""
    cls: Any = Settings
    for part in parts:
        if cls is Mapping or typing.get_origin(cls) in (Mapping, dict):
            return  # a free-form mapping (extra_body): its keys are the user's own
        fields = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else ()
        if part not in fields or part in ("source", "warnings"):
            break
        cls = _hints(cls)[part]
    else:
        return
    known = [short(p) for p in _leaf_paths()]
    guess = difflib.get_close_matches(short(tuple(parts)), known, n=1, cutoff=0.6)
    hint = f"; did you mean {guess[0]}?" if guess else "; `voicegw config --keys` lists them all"
    raise ConfigError(f"unknown {origin} {spelt!r}{hint}")


def _short_key(path: tuple[str, ...]) -> str:
    """The ``--set`` spelling: ``vllm.port``, ``server.port``."""
    return ".".join(path[1:] if path[0] == "gateway" else path)


def _env_var(path: tuple[str, ...]) -> str:
    """The env spelling: ``VOICEGW_VLLM__PORT``, ``VOICEGW_SERVER__PORT``."""
    return ENV_PREFIX + "__".join(path[1:] if path[0] == "gateway" else path).upper()


def yaml_key(path: tuple[str, ...]) -> str:
    """The spelling in a YAML file: ``sounds.vllm.port``, ``gateway.server.port``."""
    return ".".join(("sounds", *path) if path[0] == "vllm" else path)


def key_spellings(yaml_name: str) -> tuple[str, str]:
    """``(--set key, env var)`` for a key as ``describe_keys`` names it."""
    path = tuple(_canonical_path(yaml_name))
    return _short_key(path), _env_var(path)


def _parse_scalar(raw: str) -> Any:
    # Env and CLI values are strings; YAML gives "8080" -> 8080, "[a, b]" -> list, etc.
    try:
        return yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        return raw


def _canonical_tree(doc: Mapping[str, Any], warnings: list[str]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for key, value in doc.items():
        if key == "sounds" and isinstance(value, Mapping):
            for sk, sv in value.items():
                if sk == "vllm":
                    tree.setdefault("vllm", {}).update(sv or {})
                else:
                    warnings.append(f"config key 'sounds.{sk}' is not used by voicegw; ignored")
        elif key == "tts_providers" and isinstance(value, Mapping):
            for sk, sv in value.items():
                if sk == "vllm":
                    if "vllm" in tree:
                        warnings.append("both sounds.vllm and tts_providers.vllm given; merged")
                    tree.setdefault("vllm", {}).update(sv or {})
                else:
                    warnings.append(
                        f"config key 'tts_providers.{sk}' is not used by voicegw; ignored"
                    )
        elif key == "gateway" and isinstance(value, Mapping):
            tree["gateway"] = dict(value)
        else:
            warnings.append(f"unknown config key {key!r} ignored")
    return tree


def load_settings(
    path: str | os.PathLike[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Build the settings: defaults < YAML file < ``VOICEGW_*`` env < ``overrides`` (CLI).

    ``path`` falls back to ``$VOICEGW_CONFIG``. Env keys use ``__`` for nesting, e.g.
    ``VOICEGW_VLLM__PORT=8001`` or ``VOICEGW_SERVER__PORT=9000``; override keys use dots,
    e.g. ``{"vllm.timeout.connect": 5000}``.
    """
    env = os.environ if env is None else env
    warnings: list[str] = []
    source = "defaults"
    if path is None and env.get(CONFIG_ENV):
        path = env[CONFIG_ENV]
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"config file {str(p)!r} cannot be read: {exc.strerror}") from exc
        try:
            doc = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {str(p)!r} is not valid YAML: {exc}") from exc
        if not isinstance(doc, Mapping):
            raise ConfigError(f"config file {str(p)!r} must hold a mapping at the top level")
        tree = _canonical_tree(doc, warnings)
        source = str(p)
    reserved = {CONFIG_ENV, "VOICEGW_API_KEYS"}
    for key, raw in sorted(env.items()):
        if not key.startswith(ENV_PREFIX) or key in reserved:
            continue
        dotted = key[len(ENV_PREFIX) :]
        if "__" not in dotted:
            # Not a settings key (e.g. a key *holder* named by api_keys_env); leave it alone.
            continue
        parts = _canonical_path(dotted)
        _check_known(parts, key, "environment variable", _env_var)
        _set_path(tree, parts, _parse_scalar(raw))
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        parts = _canonical_path(dotted)
        _check_known(parts, dotted, "config key", _short_key)
        _set_path(tree, parts, value)
    settings = _build(Settings, tree, "", warnings)
    _cross_check(settings)
    return dataclasses.replace(settings, source=source, warnings=tuple(warnings))


def _cross_check(s: Settings) -> None:
    seg = s.gateway.segmenter
    if seg.min_chars >= seg.max_chars:
        raise ConfigError(
            f"gateway.segmenter.min_chars: {seg.min_chars} is not allowed; "
            f"expected less than max_chars ({seg.max_chars})"
        )
    r = s.vllm.retry
    if r.initial_wait_ms > r.max_wait_ms:
        raise ConfigError(
            f"vllm.retry.initial_wait_ms: {r.initial_wait_ms} is not allowed; "
            f"expected at most max_wait_ms ({r.max_wait_ms})"
        )


def describe_keys() -> list[tuple[str, str, str]]:
    """Every key as it is spelt in a YAML file (``sounds.vllm.port``), with its default and
    doc, for ``voicegw config --keys`` and the README."""
    rows: list[tuple[str, str, str]] = []

    def walk(cls: type[DataclassInstance], prefix: str) -> None:
        hints = _hints(cls)
        for f in dataclasses.fields(cls):
            if not f.init or f.name in ("source", "warnings"):
                continue
            tp = hints[f.name]
            name = f"{prefix}{f.name}"
            if isinstance(tp, type) and dataclasses.is_dataclass(tp):
                walk(tp, name + ".")
                continue
            if f.default is not dataclasses.MISSING:
                default: object = f.default
            elif callable(f.default_factory):
                default = f.default_factory()
            else:  # pragma: no cover - every settings field has a default
                raise TypeError(f"config key {name} has no default")
            rows.append(
                (yaml_key(tuple(name.split("."))), repr(default), f.metadata.get("doc", ""))
            )

    walk(Settings, "")
    return rows
