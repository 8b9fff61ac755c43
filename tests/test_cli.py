from __future__ import annotations

import json
import subprocess
import sys

import pytest

from gateway.cli import main


def run_cli(args: list[str], stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_segment_jsonl_prints_one_array_per_line() -> None:
    lines = [
        json.dumps("Hello there. This is Dr. Smith, from the U.S. office. Bye!"),
        json.dumps("你好。再见！"),
    ]
    out = run_cli(["segment", "--jsonl", "--delta-chars", "3"], "\n".join(lines) + "\n")
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert rows == [
        ["Hello there.", "This is Dr. Smith, from the U.S. office.", "Bye!"],
        ["你好。", "再见！"],
    ]


@pytest.mark.parametrize("delta", ["1", "2", "7", "0"])
def test_segment_output_does_not_depend_on_delta_size(delta: str) -> None:
    text = json.dumps("Well, e.g. this works. 3.5 is fine... really? Yes! <laugh> Ok then, bye.")
    base = run_cli(["segment", "--jsonl"], text + "\n").stdout
    assert run_cli(["segment", "--jsonl", "--delta-chars", delta], text + "\n").stdout == base


def test_segment_does_not_import_torch() -> None:
    code = (
        "import sys, io\n"
        "sys.stdin = io.StringIO('\"Hi. There.\"\\n')\n"
        "from gateway.cli import main\n"
        "rc = main(['segment', '--jsonl'])\n"
        "assert rc == 0\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "assert 'snac' not in sys.modules\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr


def test_segment_rejects_non_string_lines() -> None:
    out = run_cli(["segment", "--jsonl"], "[1, 2]\n")
    assert out.returncode == 2 and "expected a JSON string" in out.stderr


def test_config_error_exits_2_with_the_key(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["config", "--set", "vllm.temperature=5"])
    assert rc == 2
    assert "vllm.temperature: 5 is not allowed" in capsys.readouterr().err


def test_config_keys_lists_every_section(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "--keys"]) == 0
    out = capsys.readouterr().out
    for key in ("vllm.timeout.connect", "gateway.segmenter.max_chars", "gateway.auth.api_keys"):
        assert key in out
