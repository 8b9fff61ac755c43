"""The SSE parser must give the same events whatever the chunking of the byte stream."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.core.sse import SSEEvent, SSEParser
from gateway.errors import UpstreamError


def feed_all(chunks: list[bytes], parser: SSEParser | None = None) -> list[SSEEvent]:
    p = parser or SSEParser()
    out: list[SSEEvent] = []
    for c in chunks:
        out.extend(p.feed(c))
    out.extend(p.flush())
    return out


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    chunks, prev = [], 0
    for c in points:
        chunks.append(data[prev:c])
        prev = c
    chunks.append(data[prev:])
    return chunks


VLLM_STREAM = (
    b'data: {"id":"cmpl-1","object":"text_completion","created":1,"model":"m",'
    b'"choices":[{"index":0,"text":"<custom_token_17758>","logprobs":null,'
    b'"finish_reason":null,"stop_reason":null}]}\n\n'
    b'data: {"id":"cmpl-1","choices":[{"index":0,"text":"","finish_reason":"stop",'
    b'"stop_reason":128258}]}\n\n'
    b"data: [DONE]\n\n"
)


def test_vllm_stream_in_one_piece() -> None:
    events = feed_all([VLLM_STREAM])
    assert [e.data for e in events][-1] == "[DONE]"
    assert orjson.loads(events[0].data)["choices"][0]["text"] == "<custom_token_17758>"
    assert len(events) == 3


def test_byte_by_byte() -> None:
    events = feed_all([VLLM_STREAM[i : i + 1] for i in range(len(VLLM_STREAM))])
    assert events == feed_all([VLLM_STREAM])


@given(st.lists(st.integers(min_value=0, max_value=10_000), max_size=30))
def test_any_chunking_gives_the_same_events(cuts: list[int]) -> None:
    assert feed_all(split_at(VLLM_STREAM, cuts)) == feed_all([VLLM_STREAM])


@given(
    st.lists(
        st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\r\n"), max_size=20),
        max_size=8,
    ),
    st.sampled_from([b"\n", b"\r\n", b"\r"]),
    st.lists(st.integers(min_value=0, max_value=10_000), max_size=20),
)
def test_line_endings_and_utf8_split_anywhere(
    payloads: list[str], eol: bytes, cuts: list[int]
) -> None:
    body = b"".join(b"data: " + p.encode() + eol + eol for p in payloads)
    events = feed_all(split_at(body, cuts))
    assert [e.data for e in events] == payloads


def test_crlf_split_between_cr_and_lf_is_one_line_end() -> None:
    events = feed_all([b"data: a\r", b"\ndata: b\r", b"\n\r", b"\n"])
    assert [e.data for e in events] == ["a\nb"]


def test_multiline_data_comments_fields_and_bom() -> None:
    body = (
        b"\xef\xbb\xbf: keep-alive comment\n"
        b"event: error\nid: 7\nretry: 1500\ndata: one\ndata:two\nunknown: x\n\n"
        b"data\n\n"
    )
    events = feed_all([body[:1], body[1:2], body[2:]])
    assert events[0] == SSEEvent(data="one\ntwo", event="error", id="7", retry_ms=1500)
    # "data" with no colon is a field with an empty value.
    assert events[1].data == "" and events[1].id == "7"


def test_event_without_data_is_not_dispatched() -> None:
    assert feed_all([b"event: ping\n\n: only a comment\n\n"]) == []


def test_unfinished_event_at_end_of_stream_is_discarded_and_counted() -> None:
    p = SSEParser()
    assert p.feed(b'data: {"choices": [{"te') == []
    assert p.flush() == []
    assert p.discarded_bytes == len(b'data: {"choices": [{"te')
    p2 = SSEParser()
    assert p2.feed(b"data: [DONE]\n") == []  # no blank line yet
    assert p2.flush() == []
    assert p2.discarded_bytes > 0


def test_oversized_event_is_a_permanent_upstream_error() -> None:
    p = SSEParser(max_event_bytes=64)
    with pytest.raises(UpstreamError) as exc:
        p.feed(b"data: " + b"x" * 100)
    assert not exc.value.transient
    p = SSEParser(max_event_bytes=64)
    with pytest.raises(UpstreamError):
        for _ in range(10):
            p.feed(b"data: " + b"x" * 20 + b"\n")


def test_many_events_per_chunk() -> None:
    body = b"".join(b"data: %d\n\n" % i for i in range(1000))
    assert [e.data for e in feed_all([body])] == [str(i) for i in range(1000)]
