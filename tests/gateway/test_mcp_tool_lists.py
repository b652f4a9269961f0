"""What a ``tools/list`` answer keeps (``aegis.gateway.answers``): each JSON-RPC answer's
``result.tools`` cut to the tools the agent could call, in a JSON answer or in an event stream,
as an event-stream reader (the MCP SDK's, ``httpx2.EventSource``) reads it."""

from __future__ import annotations

import json
from typing import Any

import httpx2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aegis.errors import InvalidRequest
from aegis.gateway.answers import EventCut, sanitized_body
from aegis.gateway.pipeline import Result

ALLOWED = {"search", "pay"}


def _result() -> Result:
    return Result("d", "allow", 200, None, "allowed", listed=lambda name: name in ALLOWED)


def _events(text: str) -> list[tuple[str, str, str]]:
    response = httpx2.Response(
        200, headers={"content-type": "text/event-stream"}, content=text.encode(),
        request=httpx2.Request("POST", "http://gw.test/mcp"),
    )  # fmt: skip
    return [(e.event, e.data, e.id) for e in httpx2.EventSource(response)]


def _answer(*names: Any, rpc_id: Any = 1) -> dict[str, Any]:
    tools = [{"name": n, "inputSchema": {"type": "object"}} for n in names]
    return {"jsonrpc": "2.0", "id": rpc_id, "result": {"tools": tools, "nextCursor": "c2"}}


def test_a_json_answer_keeps_the_tools_the_agent_could_call() -> None:
    raw = json.dumps(_answer("search", "delete_repo", "pay", 7)).encode()
    clean = sanitized_body(raw, "application/json", True, _result())
    assert [t["name"] for t in clean["result"]["tools"]] == ["search", "pay"]
    assert clean["result"]["nextCursor"] == "c2"
    # Entries that name no tool are left out; an error answer passes as it is.
    odd = {"jsonrpc": "2.0", "id": 1, "result": {"tools": ["search", {"title": "x"}]}}
    assert (
        sanitized_body(json.dumps(odd).encode(), "application/json", True, _result())["result"][
            "tools"
        ]
        == []
    )
    error = {"jsonrpc": "2.0", "id": 1, "error": {"code": -1, "message": "no"}}
    assert sanitized_body(json.dumps(error).encode(), "application/json", True, _result()) == error


def test_a_json_answer_read_two_ways_is_refused() -> None:
    raw = b'{"jsonrpc": "2.0", "id": 1, "result": {"tools": []}, "result": {"tools": []}}'
    with pytest.raises(InvalidRequest):
        sanitized_body(raw, "application/json", True, _result())


def test_an_event_stream_keeps_its_events_and_cuts_each_tool_list() -> None:
    listing = json.dumps(_answer("search", "delete_repo"))
    half = len(listing) // 2
    text = (
        ": a comment\r\n"
        "event: message\r\nid: 7\r\n"
        f"data: {listing[:half]}\r\ndata:{listing[half:]}\r\n\r\n"
        'event: message\rdata: {"jsonrpc": "2.0", "method": "notifications/message"}\r\r'
        "data: not json\n\n"
        f"event: other\ndata: {json.dumps(_answer('delete_repo', rpc_id='x'))}\n\n"
        "data: unfinished"
    )
    clean = sanitized_body(text.encode(), "text/event-stream", False, _result())
    seen = _events(clean)
    before = _events(text)
    assert [(e, i) for e, _, i in seen] == [(e, i) for e, _, i in before]
    assert json.loads(seen[0][1]) == _answer("search")
    assert seen[1][1] == before[1][1] and seen[2][1] == "not json"
    assert json.loads(seen[3][1])["result"]["tools"] == []


def test_an_event_whose_data_a_lenient_reader_takes_for_a_tool_list_is_refused() -> None:
    text = 'data: {"jsonrpc": "2.0", "id": 1, "result": {"tools": []}, "id": 2}\n\n'
    with pytest.raises(InvalidRequest, match="reads one way"):
        sanitized_body(text.encode(), "text/event-stream", False, _result())


_NAMES = st.sampled_from(["search", "pay", "delete_repo", "wipe", "x.y", ""])
_ENDS = st.sampled_from(["\n", "\r", "\r\n"])


@st.composite
def _streams(draw: Any) -> tuple[str, list[dict[str, Any]]]:
    names = st.lists(_NAMES, max_size=5)
    messages = draw(st.lists(names.map(lambda ns: _answer(*ns)), max_size=4))
    parts = []
    for message in messages:
        end = draw(_ENDS)
        data = json.dumps(message, indent=draw(st.sampled_from([None, 1])))
        lines = [f"data: {line}" for line in data.split("\n")]
        if draw(st.booleans()):
            lines.insert(0, "event: message")
        if draw(st.booleans()):
            lines.insert(0, ": keep-alive")
        parts.append(end.join(lines) + end + end)
    return "".join(parts), messages


@settings(max_examples=200, deadline=None)
@given(_streams())
def test_every_tool_list_in_any_stream_is_cut(stream: tuple[str, list[dict[str, Any]]]) -> None:
    text, messages = stream
    clean = sanitized_body(text.encode(), "text/event-stream; charset=utf-8", False, _result())
    got = [json.loads(data) for _, data, _ in _events(clean)]
    assert len(got) == len(messages)
    for message, read in zip(messages, got, strict=True):
        kept = [t for t in message["result"]["tools"] if t["name"] in ALLOWED]
        assert read == {**message, "result": {**message["result"], "tools": kept}}


@pytest.mark.parametrize("description", ["Area in m²", "３件まで検索します", "1.5E15 rows"])
def test_an_event_stream_is_cut_whatever_text_it_holds(description: str) -> None:
    """No mask applies to a tool list: text the masks could not read as a client does (other
    digits, numbers with exponents) is no reason to refuse it."""
    listing = {**_answer("search", "wipe")}
    listing["result"]["tools"][0]["description"] = description
    raw = f"event: message\r\ndata: {json.dumps(listing, ensure_ascii=False)}\r\n\r\n"
    clean = sanitized_body(raw.encode(), "text/event-stream", False, _result())
    [(_, data, _)] = _events(clean)
    assert json.loads(data)["result"]["tools"] == [listing["result"]["tools"][0]]


def test_a_stream_starting_with_a_byte_order_mark_is_refused() -> None:
    """WHATWG readers (JavaScript's) drop one leading U+FEFF and read the `data` line after it;
    the MCP SDK's reader keeps it and ignores that line: the two read different tool lists, so
    no cut serves both."""
    text = "\ufeffdata: x\ndata: " + json.dumps(_answer("search", "delete_repo")) + "\n\n"
    with pytest.raises(InvalidRequest, match="byte-order mark"):
        sanitized_body(text.encode(), "text/event-stream", False, _result())
    with pytest.raises(InvalidRequest, match="byte-order mark"):
        EventCut(lambda _: True, 1024).feed(text.encode()[:3])
    assert EventCut(lambda _: True, 1024).feed(b"") == ""


@pytest.mark.parametrize("ctype", ["application/json-rpc", "application/jsonrequest", "text/plain"])
def test_a_tool_list_neither_json_nor_an_event_stream_is_refused(ctype: str) -> None:
    """MCP clients read any application/json* answer as JSON: one the cut would not read as
    JSON is refused (502) rather than passed whole."""
    raw = json.dumps(_answer("search", "delete_repo")).encode()
    with pytest.raises(InvalidRequest, match="must be JSON"):
        sanitized_body(raw, ctype, False, _result())


def _cut_in_chunks(text: str, cuts: list[int], limit: int = 1 << 20) -> str:
    raw = text.encode()
    points = sorted({min(c, len(raw)) for c in cuts})
    cutter = EventCut(_result().listed or (lambda _: True), limit)
    out, start = "", 0
    for point in [*points, len(raw)]:
        out += cutter.feed(raw[start:point])
        start = point
    return out + cutter.feed(b"", final=True)


@settings(max_examples=200, deadline=None)
@given(_streams(), st.lists(st.integers(min_value=0, max_value=4000), max_size=12))
def test_a_stream_cut_as_it_passes_reads_as_one_cut_whole(
    stream: tuple[str, list[dict[str, Any]]], cuts: list[int]
) -> None:
    """However the upstream's bytes arrive (a CRLF or a UTF-8 character split between reads), a
    reader takes from the stream cut event by event what it takes from the whole cut at once."""
    text, _ = stream
    text = ": hello\n" + text.replace("search", "s\u00e9arch", 1) + "data: unended"
    whole = sanitized_body(text.encode(), "text/event-stream", False, _result())
    assert _events(_cut_in_chunks(text, cuts)) == _events(whole)


def test_an_event_longer_than_the_limit_ends_the_stream() -> None:
    cutter = EventCut(lambda _: True, 64)
    assert cutter.feed(b"data: 1\n\n") == "data: 1\n\n"
    with pytest.raises(InvalidRequest, match="longer than 64"):
        cutter.feed(b"data: " + b"x" * 80)


def test_a_crlf_split_between_reads_is_one_line_end() -> None:
    """A CR at the end of a read may be the first half of a CRLF: taken for a line end of its
    own, the LF after it would end the event early, splitting one message in two."""
    listing = json.dumps(_answer("search", "delete_repo"), indent=1).split("\n")
    text = "".join(f"data: {line}\r\n" for line in listing) + "\r\n"
    cuts = [i + 1 for i, byte in enumerate(text.encode()) if byte == 0x0D]  # after every CR
    [(_, data, _)] = _events(_cut_in_chunks(text, cuts))
    assert [t["name"] for t in json.loads(data)["result"]["tools"]] == ["search"]


def test_each_byte_is_read_once_however_the_stream_is_split(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A long line arriving in small reads is not scanned again with each read (that is
    quadratic in the line, on the event loop): the line ends are looked for in new text only."""
    import aegis.gateway.answers as answers

    scanned = [0]
    real = answers._EVENT_LINE_END

    class Counting:
        def finditer(self, text: str, pos: int = 0) -> Any:
            scanned[0] += len(text) - pos
            return real.finditer(text, pos)

    monkeypatch.setattr(answers, "_EVENT_LINE_END", Counting())
    raw = b"data: " + b"x" * 100_000 + b"\n\n"
    assert _cut_in_chunks(raw.decode(), list(range(0, len(raw), 256))).endswith("x\n\n")
    assert scanned[0] <= len(raw)


def test_a_keep_alive_comment_passes_at_once() -> None:
    cutter = EventCut(lambda _: True, 1024)
    assert cutter.feed(b": keep-alive\n") == ": keep-alive\n"
    assert cutter.feed(b"data: 1\n: inside an event\n") == ""
    assert cutter.feed(b"\n") == "data: 1\n: inside an event\n\n"


def test_data_nested_too_deeply_cannot_be_cut() -> None:
    deep = b"data: " + b"[" * 100_000 + b"]" * 100_000 + b"\n\n"
    with pytest.raises(InvalidRequest, match="nested too deeply"):
        EventCut(lambda _: True, 1 << 20).feed(deep)
