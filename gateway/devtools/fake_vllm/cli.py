"""``voicegw fake-vllm``: the fake vLLM's command line.

Flags map one to one onto :class:`FakeVLLMOptions` and :class:`Faults`. ``--fd`` serves
on a listening socket inherited from a parent (``voicegw serve --demo``), and
``--parent-pid`` makes the fake exit when that parent is gone.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Sequence

from gateway.devtools.fake_vllm.faults import Faults
from gateway.devtools.fake_vllm.http import create_fake_vllm_app
from gateway.devtools.fake_vllm.options import FakeVLLMOptions

log = logging.getLogger("voicegw.fake_vllm")


def build_arg_parser() -> argparse.ArgumentParser:
    d = FakeVLLMOptions()
    fd = Faults()
    p = argparse.ArgumentParser(
        prog="voicegw fake-vllm",
        description="Serve a fake vLLM (Orpheus TTS) for tests, demos and benchmarks.",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model", default=d.model, help="served model name")
    p.add_argument("--max-model-len", type=int, default=d.max_model_len)
    p.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs)
    p.add_argument(
        "--tokens-per-second",
        type=float,
        default=d.tokens_per_second,
        help="per stream; 0 = as fast as possible",
    )
    p.add_argument("--first-token-ms", type=float, default=d.first_token_ms)
    p.add_argument("--frames-per-char", type=float, default=d.frames_per_char)
    p.add_argument("--multi-token-rate", type=float, default=d.multi_token_rate)
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the audio codes")
    p.add_argument(
        "--legacy-context-errors",
        action="store_true",
        help="400 when prompt + max_tokens exceeds --max-model-len (old vLLM)",
    )
    p.add_argument("--api-key", default="", help="require this bearer token")
    p.add_argument("--chat-tokens-per-second", type=float, default=d.chat_tokens_per_second)
    p.add_argument("--jitter", type=float, default=d.jitter, help="0..1 pacing spread")
    p.add_argument("--fragment-writes", action="store_true")
    g = p.add_argument_group("fault injection (probabilities per request)")
    g.add_argument("--error-rate", type=float, default=fd.error_rate)
    g.add_argument("--error-status", type=int, default=fd.error_status)
    g.add_argument("--disconnect-rate", type=float, default=fd.disconnect_rate)
    g.add_argument("--stall-rate", type=float, default=fd.stall_rate)
    g.add_argument("--stall-seconds", type=float, default=fd.stall_seconds)
    g.add_argument("--slow-first-token-rate", type=float, default=fd.slow_first_token_rate)
    g.add_argument("--slow-first-token-seconds", type=float, default=fd.slow_first_token_seconds)
    g.add_argument("--bad-token-rate", type=float, default=fd.bad_token_rate)
    g.add_argument("--stream-error-rate", type=float, default=fd.stream_error_rate)
    g.add_argument("--fault-after-tokens", type=int, default=fd.after_tokens)
    g.add_argument("--fault-seed", type=int, default=fd.seed)
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    p.add_argument(
        "--fd",
        type=int,
        default=None,
        help="serve on this inherited listening socket instead of --host/--port",
    )
    p.add_argument(
        "--parent-pid",
        type=int,
        default=None,
        help="exit when this process (the one that started us) is gone",
    )
    return p


def options_from_args(ns: argparse.Namespace) -> FakeVLLMOptions:
    for name in (
        "error_rate",
        "disconnect_rate",
        "stall_rate",
        "slow_first_token_rate",
        "bad_token_rate",
        "stream_error_rate",
        "multi_token_rate",
    ):
        v = getattr(ns, name)
        if not 0.0 <= v <= 1.0:
            raise SystemExit(f"--{name.replace('_', '-')}: {v} is not a probability (0..1)")
    if ns.max_num_seqs < 1 or ns.max_model_len < 16:
        raise SystemExit("--max-num-seqs must be >= 1 and --max-model-len >= 16")
    return FakeVLLMOptions(
        model=ns.model,
        max_model_len=ns.max_model_len,
        max_num_seqs=ns.max_num_seqs,
        tokens_per_second=ns.tokens_per_second,
        first_token_ms=ns.first_token_ms,
        frames_per_char=ns.frames_per_char,
        multi_token_rate=ns.multi_token_rate,
        seed=ns.seed,
        legacy_context_errors=ns.legacy_context_errors,
        api_key=ns.api_key,
        chat_tokens_per_second=ns.chat_tokens_per_second,
        fragment_writes=ns.fragment_writes,
        jitter=ns.jitter,
        faults=Faults(
            error_rate=ns.error_rate,
            error_status=ns.error_status,
            disconnect_rate=ns.disconnect_rate,
            stall_rate=ns.stall_rate,
            stall_seconds=ns.stall_seconds,
            slow_first_token_rate=ns.slow_first_token_rate,
            slow_first_token_seconds=ns.slow_first_token_seconds,
            bad_token_rate=ns.bad_token_rate,
            stream_error_rate=ns.stream_error_rate,
            after_tokens=ns.fault_after_tokens,
            seed=ns.fault_seed,
        ),
    )


def _exit_with_parent(parent_pid: int) -> None:
    """Never outlive the gateway that started us (``voicegw serve --demo``), even when it
    is killed with SIGKILL and cannot stop us itself."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
        # The parent may have died before prctl; then we were already reparented.
        if os.getppid() != parent_pid:
            raise SystemExit(f"fake vLLM: parent {parent_pid} is gone; not starting")
        return

    def watch() -> None:  # elsewhere: poll, reparenting shows the parent is gone
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def main(argv: Sequence[str] | None = None) -> int:
    """``voicegw fake-vllm``: parse flags and serve until interrupted."""
    import uvicorn

    ns = build_arg_parser().parse_args(argv)
    options = options_from_args(ns)
    if ns.parent_pid is not None:
        _exit_with_parent(ns.parent_pid)
    logging.basicConfig(level=ns.log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    sock = socket.socket(fileno=ns.fd) if ns.fd is not None else None
    host, port = sock.getsockname()[:2] if sock is not None else (ns.host, ns.port)
    log.info(
        "fake vLLM serving %s on http://%s:%d (max_model_len=%d, max_num_seqs=%d, %.0f tok/s)",
        options.model,
        host,
        port,
        options.max_model_len,
        options.max_num_seqs,
        options.tokens_per_second,
    )
    config = uvicorn.Config(
        create_fake_vllm_app(options),
        host=ns.host,
        port=ns.port,
        log_level=ns.log_level,
        access_log=False,
        timeout_graceful_shutdown=2,
    )
    server = uvicorn.Server(config)
    # A socket handed over by the parent is already bound: no race for a free port.
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C is the normal way to stop it
        server.run(sockets=[sock] if sock is not None else None)
    return 0 if server.started else 3
