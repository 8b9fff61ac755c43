"""The README's promises: its client example runs as printed, and every config key is in
its table (the table is generated from ``describe_keys``, so a new key without a row, or
a changed default, fails here)."""

from __future__ import annotations

import re
import wave
from pathlib import Path
from typing import Any

import pytest

from gateway.config import describe_keys
from tests.server.conftest import running_gateway
from tests.server.fakes import FakeSynth, fake_services

README = Path(__file__).resolve().parents[1] / "README.md"


def readme() -> str:
    return README.read_text(encoding="utf-8")


def client_example() -> str:
    m = re.search(r"<!-- client-example -->\s*```python\n(.*?)```", readme(), re.S)
    assert m, "README lost its client example"
    return m.group(1)


@pytest.mark.anyio
async def test_the_client_example_runs_as_printed(tmp_path: Path) -> None:
    synth = FakeSynth()
    namespace: dict[str, Any] = {"__name__": "readme_example"}
    exec(compile(client_example(), "README.md", "exec"), namespace)
    text = "Hello there. This is the README's example, spoken in order."
    async with running_gateway(fake_services(synth)) as (served, _):
        out = tmp_path / "reply.wav"
        samples = await namespace["speak"](text, url=f"{served.ws_url}/v1/tts/stream", out=str(out))
    with wave.open(str(out)) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, 24000)
        assert w.getnframes() == samples
    # FakeSynth speaks chunks_for(text) chunks of chunk_bytes per segment.
    want = sum(synth.chunks_for(t) * synth.chunk_bytes // 2 for t in synth.finished)
    assert samples == want > 0
    assert " ".join(synth.finished) == text


def test_every_config_key_is_documented_with_its_default() -> None:
    text = readme()
    missing = []
    for name, default, doc in describe_keys():  # named as in YAML: sounds.vllm.port
        row = re.search(rf"^\| `{re.escape(name)}` \| `([^`]*)` \| (.*) \|$", text, re.M)
        documented = row is not None and row.group(2) == doc
        if not documented or not default.startswith(row.group(1).removesuffix("…'")):
            missing.append(name)
    assert not missing, f"README config table is out of date for: {missing}"
