"""The ``voicegw`` command line. Subcommands import their heavy dependencies lazily:
``voicegw segment`` must stay light (no torch) so that it starts instantly.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from gateway import __version__

if TYPE_CHECKING:
    from gateway.config import Settings

log = logging.getLogger("voicegw")


def _config_overrides(args: argparse.Namespace) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    for item in getattr(args, "set", None) or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects KEY=VALUE, got {item!r}")
        import yaml

        overrides[key] = yaml.safe_load(value) if value.strip() else ""
    return overrides


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="YAML config (default: $VOICEGW_CONFIG)")
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override any key, e.g. --set vllm.port=8001 --set segmenter.max_chars=200",
    )


def _load(args: argparse.Namespace, extra: dict[str, Any] | None = None) -> Settings:
    from gateway.config import load_settings

    overrides = _config_overrides(args)
    overrides.update(extra or {})
    settings = load_settings(args.config, overrides=overrides)
    for w in settings.warnings:
        log.warning("config: %s", w)
    return settings


def cmd_segment(args: argparse.Namespace) -> int:
    """Show how text will be split, turn by turn."""
    import orjson

    from gateway.core.segmenter import Segmenter, SegmenterOptions

    settings = _load(args)
    # No clock here: idle release would depend on wall time, not on the text.
    opts = SegmenterOptions.from_settings(settings.gateway.segmenter, idle_flush=False)
    segmenter = Segmenter(opts)

    def run(text: str) -> list[str] | list[dict[str, str]]:
        step = args.delta_chars if args.delta_chars and args.delta_chars > 0 else len(text) or 1
        out = []
        for i in range(0, len(text), step):
            out.extend(segmenter.feed(text[i : i + step]))
        out.extend(segmenter.flush())
        if args.reasons:
            return [{"text": s.text, "reason": s.reason} for s in out]
        return [s.text for s in out]

    if args.jsonl:
        for lineno, line in enumerate(sys.stdin, 1):
            if not line.strip():
                continue
            try:
                text = orjson.loads(line)
            except orjson.JSONDecodeError as exc:
                print(f"line {lineno}: not JSON: {exc}", file=sys.stderr)
                return 2
            if not isinstance(text, str):
                print(f"line {lineno}: expected a JSON string", file=sys.stderr)
                return 2
            sys.stdout.write(orjson.dumps(run(text)).decode() + "\n")
    else:
        text = " ".join(args.text) if args.text else sys.stdin.read()
        sys.stdout.write(orjson.dumps(run(text), option=orjson.OPT_INDENT_2).decode() + "\n")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    """Print the effective settings, or every key with its default."""
    import dataclasses

    import orjson

    if args.keys:
        from gateway.config import describe_keys, key_spellings

        # The YAML spelling first (what the README's table shows); --set and the env var
        # use a shorter path, so both are named too.
        print("# YAML key = default    # meaning  [--set KEY=VALUE | environment variable]")
        for name, shown, doc in describe_keys():
            flag, env = key_spellings(name)
            meaning = f"{doc}  " if doc else ""
            print(f"{name} = {shown}    # {meaning}[--set {flag}=… | {env}]")
        return 0
    settings = _load(args)

    def default(o: Any) -> Any:
        if isinstance(o, tuple):
            return list(o)
        return dict(o)

    data = dataclasses.asdict(settings)
    print(orjson.dumps(data, default=default, option=orjson.OPT_INDENT_2).decode())
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the gateway."""
    extra: dict[str, Any] = {
        "server.host": args.host,
        "server.port": args.port,
        "server.workers": args.workers,
    }
    if args.demo:
        extra["gateway.demo"] = True
    settings = _load(args, extra)
    from gateway.server.services import run_server

    return run_server(settings)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="voicegw", description="Real-time voice gateway for Orpheus TTS on vLLM."
    )
    parser.add_argument("--version", action="version", version=f"voicegw {__version__}")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning"])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("segment", help="show how text is cut into speakable segments")
    _add_config_args(p)
    p.add_argument("text", nargs="*", help="text (default: stdin)")
    p.add_argument("--jsonl", action="store_true", help="each stdin line is a JSON string turn")
    p.add_argument("--delta-chars", type=int, default=0, help="feed in deltas of N chars")
    p.add_argument("--reasons", action="store_true", help="also print why each cut was made")
    p.set_defaults(func=cmd_segment)

    p = sub.add_parser("serve", help="run the gateway")
    _add_config_args(p)
    p.add_argument("--host", help="listen address (gateway.server.host)")
    p.add_argument("--port", type=int, help="listen port (gateway.server.port)")
    p.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="worker processes sharing the port; 0 = one per usable core (gateway.server.workers)",
    )
    p.add_argument(
        "--demo",
        action="store_true",
        help="start a fake vLLM and point the gateway at it; allow random SNAC weights",
    )
    p.set_defaults(func=cmd_serve)

    sub.add_parser(
        "fake-vllm", help="a fake vLLM server for tests, demos and benchmarks", add_help=False
    )

    p = sub.add_parser("config", help="print the effective settings")
    _add_config_args(p)
    p.add_argument("--keys", action="store_true", help="list every key with its default")
    p.set_defaults(func=cmd_config)

    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["fake-vllm"]:
        # The fake server has its own flags; hand them over untouched.
        from gateway.devtools.fake_vllm import main as fake_main

        return fake_main(argv[1:])
    try:
        return _run(argv)
    except BrokenPipeError:
        # The reader went away (`voicegw config --keys | head`, or `--help`): stop quietly,
        # as a tool killed by SIGPIPE would. Point stdout at /dev/null so the exit's flush
        # is quiet too.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 128 + signal.SIGPIPE
    except KeyboardInterrupt:
        return 128 + signal.SIGINT


def _run(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from gateway.errors import ConfigError, GatewayError, ModelLoadError

    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"voicegw: configuration error: {exc}", file=sys.stderr)
        return 2
    except GatewayError as exc:
        # A start that cannot work (port taken, no SNAC weights, ...): one line with the
        # cause and what to do; the traceback only when asked for.
        log.debug("voicegw %s failed", args.command, exc_info=True)
        hint = ""
        if isinstance(exc, ModelLoadError):
            hint = (
                ". To go on: --set vllm.snac_model=DIR (config.json + pytorch_model.bin), "
                "or try it with random weights: voicegw serve --demo"
            )
        print(f"voicegw {args.command}: {exc.message}{hint}", file=sys.stderr)
        return 1
