"""The browser benchmark's figures (``scripts/bench_browser.py``): from a page snapshot to
a session record, and from session records to the table. The browser run itself is the
script's job (minutes of real-time audio), not the suite's."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

_PATH = Path(__file__).resolve().parents[1] / "scripts" / "bench_browser.py"
_spec = importlib.util.spec_from_file_location("bench_browser", _PATH)
assert _spec and _spec.loader
bb = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("bench_browser", bb)
_spec.loader.exec_module(bb)


def snap(**over: Any) -> dict[str, Any]:
    """A snapshot of a turn of 48000 samples in 3 segments, played whole."""
    s = {
        "turnsDone": [{"turn": 0, "segments": 3, "samples": 48000}],
        "samplesReceived": 48000,
        "samplesPlayed": 48000,
        "ttfaMs": 250.0,
        "underruns": 0,
        "underrunMs": 0.0,
        "underrunLog": [],
        "lowWaterLog": [{"turn": 0, "lowWaterMs": 120.0, "lowWaterAtMs": 900.0}],
        "startLog": [{"buffered": 2400, "afterUnderrun": False}],
        "contextRate": 24000,
    }
    s.update(over)
    return s


def test_a_whole_turn_is_ok_and_its_figures_are_read() -> None:
    r = bb.session_record(snap(targetMs=160.0, targetMaxMs=240.0), None, [], 3.5)
    assert r["ok"] and r["failure"] is None
    assert r["ttfa_ms"] == 250.0 and r["underruns"] == 0
    assert r["low_water_ms"] == [120.0]
    assert r["target_ms"] == 160.0 and r["target_max_ms"] == 240.0
    assert r["segments"] == 3 and r["audio_s"] == 2.0


def test_a_page_without_a_playout_target_reads_none() -> None:
    r = bb.session_record(snap(), None, [], 1.0)
    assert r["ok"]
    assert r["target_ms"] is None and r["target_max_ms"] is None


@pytest.mark.parametrize(
    ("over", "failure", "why"),
    [
        ({"samplesPlayed": 47000}, None, "not every sample played"),
        ({"samplesReceived": 47000, "samplesPlayed": 47000}, None, "not every sample played"),
        ({"turnsDone": []}, None, "not every sample played"),
        ({}, "TimeoutError: waiting for function", "TimeoutError: waiting for function"),
    ],
)
def test_a_session_that_did_not_play_everything_is_not_ok(
    over: dict[str, Any], failure: str | None, why: str
) -> None:
    r = bb.session_record(snap(**over), failure, [], 1.0)
    assert not r["ok"]
    assert r["failure"] == why


def test_a_turn_without_a_low_water_mark_adds_none_to_the_figures() -> None:
    log = [{"turn": 0, "lowWaterMs": None, "lowWaterAtMs": 0}]
    assert bb.session_record(snap(lowWaterLog=log), None, [], 1.0)["low_water_ms"] == []


@pytest.mark.parametrize("n", [1, 2, 5, 20])
def test_percentile_is_numpys_linear_interpolation(n: int) -> None:
    xs = [float((7 * i) % 11) + i / 3 for i in range(n)]
    for q in (0, 50, 90, 99, 100):
        assert bb.percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))
    assert bb.percentile([], 50) is None


def test_summary_counts_completed_sessions_and_the_failures_beside_them() -> None:
    rows = [
        bb.session_record(snap(ttfaMs=100.0, targetMaxMs=200.0), None, [], 1.0),
        bb.session_record(
            snap(
                ttfaMs=300.0,
                underruns=2,
                underrunMs=85.5,
                targetMaxMs=400.0,
                lowWaterLog=[{"turn": 0, "lowWaterMs": 0.0, "lowWaterAtMs": 10.0}],
            ),
            None,
            ["console.error: x"],
            1.0,
        ),
        bb.session_record(snap(ttfaMs=200.0, targetMaxMs=300.0), None, [], 1.0),
        # Failed: its figures (a huge underrun) must not count, but it is counted as failed.
        bb.session_record(snap(underruns=9, underrunMs=9999.0, samplesPlayed=1), None, [], 1.0),
    ]
    s = bb.summarise(rows)
    assert s["sessions"] == 4 and s["failed"] == 1
    assert s["underruns"] == 2 and s["sessions_with_underruns"] == 1
    assert s["underrun_ms"] == 85.5
    assert s["ttfa_p50_ms"] == 200.0
    assert s["ttfa_p99_ms"] == pytest.approx(298.0)
    assert s["target_max_ms"] == 400.0 and s["target_median_ms"] == 300.0
    assert s["low_water_p50_ms"] == 120.0 and s["low_water_min_ms"] == 0.0
    assert s["page_errors"] == 1


def test_summary_without_targets_or_sessions_that_completed() -> None:
    s = bb.summarise([bb.session_record({}, "Error: page crashed", [], 1.0)])
    assert s["sessions"] == 1 and s["failed"] == 1
    assert s["ttfa_p50_ms"] is None and s["target_max_ms"] is None
    assert s["low_water_min_ms"] is None and s["underruns"] == 0


def test_table_row() -> None:
    rows = [
        bb.session_record(snap(underruns=1, underrunMs=42.4), None, [], 1.0),
        bb.session_record({}, "Error: x", [], 1.0),
    ]
    table = bb.markdown([{"speed": 1.5, "load": "busy", "summary": bb.summarise(rows)}])
    head, rule, row = table.splitlines()
    assert head.count("|") == rule.count("|") == row.count("|") == 13
    assert row == "| 1.5× | busy | 2 (1 failed) | 1 | 1 | 42 | 250 | 250 | - | - | 120 | 120 |"
