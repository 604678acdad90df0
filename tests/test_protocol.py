"""The pure wire layer: request splitting, mode sniffing, frame and reply codecs."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from bgservice.protocol import (
    PREFACE,
    FrameDecoder,
    Mode,
    Oversized,
    ReplyDecoder,
    framed_reply,
    framed_request,
    one_shot_error,
    sniff,
    split_request,
)

LEGACY_ERROR = re.compile(rb"^[45][0-9]{2}:")


def test_split_cleans_the_module_name_like_the_original():
    assert split_request(b"test:x") == ("test", b"x")
    assert split_request(b" l.e$ss-_1 :a:b") == ("less-_1", b"a:b")
    assert split_request(b"helo") == ("helo", b"")
    assert split_request(b"helo\r\n") == ("helo", b"")
    assert split_request(b"") == ("", b"")


def test_split_remembers_short_names_only():
    # The cleaned name of a short head is remembered (the regex was most of a small
    # request's parsing); a long one (a request with no colon is all head, up to the
    # request limit) is cleaned each time, never kept.
    from bgservice import protocol

    protocol._name.cache_clear()
    long = b"x" * (protocol.NAME_CACHED + 1)
    assert split_request(long + b":d") == (long.decode(), b"d")
    assert protocol._name.cache_info().currsize == 0
    assert split_request(b"a.b-c:1") == ("ab-c", b"1")
    assert protocol._name.cache_info().currsize == 1
    assert split_request(b"a.b-c:2") == ("ab-c", b"2")  # remembered, the same


@given(st.binary(max_size=80), st.binary(max_size=8))
def test_split_gives_what_the_regex_gives(head, data):
    head = head.replace(b":", b"")
    expected = re.sub(rb"[^A-Za-z0-9_-]", b"", head).decode("ascii")
    assert split_request(head + b":" + data) == (expected, data)
    assert split_request(head + b":" + data) == (expected, data)  # remembered, the same


def test_split_keeps_data_binary():
    raw = b"echo:" + bytes(range(256))
    assert split_request(raw) == ("echo", bytes(range(256)))


@given(st.binary())
def test_split_never_fails_and_name_is_clean(raw):
    name, data = split_request(raw)
    assert re.fullmatch(r"[A-Za-z0-9_-]*", name)
    assert raw.endswith(data)


def test_sniff():
    assert sniff(b"") is None
    assert sniff(b"\x00") is None
    assert sniff(b"\x00:F") is None
    assert sniff(PREFACE) is Mode.FRAMED
    assert sniff(b"test:x") is Mode.ONE_SHOT
    assert sniff(b"\x00x") is Mode.ONE_SHOT


@given(st.binary(min_size=1))
def test_no_meaningful_one_shot_request_is_read_as_framed(raw):
    # Every request that names a module has a non-empty cleaned name; the preface's
    # one-shot reading has an empty name. So only nameless requests can sniff as framed.
    if sniff(raw[:4]) is Mode.FRAMED:
        assert split_request(raw)[0] == ""


def test_one_shot_error_matches_the_original_clients_regex():
    assert one_shot_error(400, "Unknown request") == b"400: Unknown request"
    assert LEGACY_ERROR.match(one_shot_error(504, "Timed out"))


def test_framed_reply_layout_is_byte_exact():
    assert framed_reply(200, b"Test") == b"200\x00\x00\x00\x04Test"
    assert framed_request(b"test:x") == b"\x00\x00\x00\x06test:x"


@given(st.lists(st.binary(max_size=300), max_size=20), st.integers(1, 50))
def test_frame_decoder_reassembles_any_chunking(payloads, chunk):
    stream = b"".join(framed_request(p) for p in payloads)
    decoder = FrameDecoder(max_size=1000)
    out = []
    for i in range(0, len(stream), chunk):
        out.extend(decoder.feed(stream[i : i + chunk]))
    assert out == payloads
    assert not decoder.partial


@given(st.lists(st.binary(max_size=20), max_size=10))
def test_frame_decoder_takes_whole_frames_one_read_each(payloads):
    # A lock-step client's reads: each exactly one frame (the decoder's fast path), the
    # largest allowed and an oversized one among them.
    decoder = FrameDecoder(max_size=20)
    for payload in [*payloads, b"", b"y" * 20]:
        assert decoder.feed(framed_request(payload)) == [payload]
    assert decoder.feed(framed_request(b"z" * 21)) == [Oversized(21)]
    assert decoder.feed(framed_request(b"ok")) == [b"ok"]
    assert not decoder.partial


def test_frame_decoder_skips_oversized_without_buffering():
    decoder = FrameDecoder(max_size=10)
    stream = framed_request(b"x" * 100_000) + framed_request(b"ok")
    out = []
    for i in range(0, len(stream), 4096):
        out.extend(decoder.feed(stream[i : i + 4096]))
        assert len(decoder._buf) <= 4096
    assert out == [Oversized(100_000), b"ok"]


@given(st.lists(st.tuples(st.integers(100, 599), st.binary(max_size=100)), max_size=10))
def test_reply_decoder_roundtrip(replies):
    stream = b"".join(framed_reply(s, b) for s, b in replies)
    decoder = ReplyDecoder()
    out = []
    for i in range(len(stream)):
        out.extend(decoder.feed(stream[i : i + 1]))
    assert out == replies
