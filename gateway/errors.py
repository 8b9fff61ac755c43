"""One exception root for the whole gateway.

Every error carries a stable machine-readable ``code`` (sent to clients and used as a
metrics label) and says whether it is *transient* (retrying the same work may succeed)
or *permanent* (it will fail the same way again). Retry logic looks only at
``transient``; it never pattern-matches messages.
"""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    """Documented error codes. Clients may rely on these strings."""

    # Client / protocol errors (permanent for the offending message, never fatal to others).
    BAD_JSON = "bad_json"
    BAD_MESSAGE = "bad_message"
    UNKNOWN_TYPE = "unknown_type"
    BAD_VOICE = "bad_voice"
    BAD_PARAMETER = "bad_parameter"
    BINARY_NOT_ALLOWED = "binary_not_allowed"
    FRAME_TOO_LARGE = "frame_too_large"
    TURN_TOO_LONG = "turn_too_long"
    RATE_LIMITED = "rate_limited"
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN_ORIGIN = "forbidden_origin"
    TOO_MANY_SESSIONS = "too_many_sessions"
    AT_CAPACITY = "at_capacity"
    SLOW_CLIENT = "slow_client"
    # The gateway is shutting down (SIGTERM): new work is refused, a session ends after its turn.
    DRAINING = "draining"
    # HTTP only.
    BODY_TOO_LARGE = "body_too_large"
    REQUEST_TIMEOUT = "request_timeout"
    NOT_FOUND = "not_found"
    # Upstream (vLLM) errors.
    OVERLOADED = "overloaded"
    UPSTREAM_UNAVAILABLE = "upstream_unavailable"
    UPSTREAM_TIMEOUT = "upstream_timeout"
    UPSTREAM_ERROR = "upstream_error"
    UPSTREAM_REJECTED = "upstream_rejected"
    CONTEXT_LENGTH = "context_length"
    TRUNCATED = "truncated"
    NO_AUDIO = "no_audio"
    # Gateway internals.
    DECODER_ERROR = "decoder_error"
    BUFFER_OVERFLOW = "buffer_overflow"
    CONFIG_ERROR = "config_error"
    MODEL_LOAD_FAILED = "model_load_failed"
    SERVE_FAILED = "serve_failed"
    LLM_ERROR = "llm_error"
    INTERNAL = "internal_error"


class GatewayError(Exception):
    """Root of every error the gateway raises on purpose."""

    default_code: ErrorCode = ErrorCode.INTERNAL
    default_transient: bool = False

    def __init__(
        self,
        message: str,
        *,
        code: ErrorCode | None = None,
        transient: bool | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code: ErrorCode = code if code is not None else self.default_code
        self.transient: bool = transient if transient is not None else self.default_transient

    def __repr__(self) -> str:
        kind = "transient" if self.transient else "permanent"
        return f"{type(self).__name__}({self.code.value}, {kind}: {self.message!r})"


class ConfigError(GatewayError):
    """A setting is invalid. Raised at start-up, names the key, the value and what is allowed."""

    default_code = ErrorCode.CONFIG_ERROR


class ServeError(GatewayError):
    """``voicegw serve`` cannot start or keep running (port taken, demo upstream gone); the
    message is one line that says why and what to do."""

    default_code = ErrorCode.SERVE_FAILED


class ProtocolError(GatewayError):
    """A client sent something the protocol does not allow."""

    default_code = ErrorCode.BAD_MESSAGE


class VoiceError(ProtocolError):
    default_code = ErrorCode.BAD_VOICE


class UpstreamError(GatewayError):
    """The TTS upstream failed. ``transient`` decides whether a retry may help."""

    default_code = ErrorCode.UPSTREAM_ERROR


class OverloadedError(UpstreamError):
    """The bounded request queue is full: fail fast instead of dropping silently."""

    default_code = ErrorCode.OVERLOADED
    default_transient = True


class ContextLengthError(UpstreamError):
    default_code = ErrorCode.CONTEXT_LENGTH


class DecoderError(GatewayError):
    default_code = ErrorCode.DECODER_ERROR


class ModelLoadError(DecoderError):
    default_code = ErrorCode.MODEL_LOAD_FAILED


class BufferOverflowError(GatewayError):
    """A bounded buffer would have grown past its limit."""

    default_code = ErrorCode.BUFFER_OVERFLOW
