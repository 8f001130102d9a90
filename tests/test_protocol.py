"""Wire format: headers and verdicts round-trip; anything malformed is a ProtocolError."""

from __future__ import annotations

import os

import numpy as np
import pytest

from inspectd.core.wire import (
    FrameHeader,
    ProtocolError,
    Verdict,
    pixels_to_array,
    printable,
    to_rgb8,
    valid_name,
)


def _header(**kw) -> FrameHeader:
    base = dict(frame_id="f1", camera="cam1", sku="GM06_08", capture_ts=1.0, deadline_ts=2.0,
                shape=(4, 5, 3), dtype="uint8", pixel_format="rgb8", part_id="17")
    base.update(kw)
    return FrameHeader(**base)


def test_header_and_verdict_round_trip():
    h = _header()
    assert FrameHeader.decode(h.encode()) == h
    v = Verdict.for_frame(h, "NG", score=2.5, threshold=1.0, model_version="v3",
                          timings_ms={"infer": 12.0})
    back = Verdict.decode(v.encode())
    assert back == v and back.shape == (4, 5, 3) and not back.passed
    assert Verdict.for_frame(h, "OK").passed


@pytest.mark.parametrize("raw", [b"", b"{", b"[]", b'{"v": 99}', b'{"v": 1, "frame_id": 1}'])
def test_malformed_headers_are_protocol_errors(raw):
    with pytest.raises(ProtocolError):
        FrameHeader.decode(raw)


def test_unknown_verdict_kind_is_rejected():
    v = Verdict(frame_id="x", verdict="OK")
    with pytest.raises(ProtocolError, match="verdict .MAYBE.: expected one of OK"):
        Verdict.decode(v.encode().replace(b'"OK"', b'"MAYBE"'))


def test_pixels_must_match_the_header():
    h = _header()
    img = np.arange(60, dtype=np.uint8).reshape(4, 5, 3)
    assert np.array_equal(pixels_to_array(h, img.tobytes()), img)
    with pytest.raises(ProtocolError, match="needs 60"):
        pixels_to_array(h, b"\x00" * 59)
    with pytest.raises(ProtocolError, match="dtype"):
        pixels_to_array(_header(dtype="float64"), img.tobytes())
    with pytest.raises(ProtocolError, match="pixel format"):
        pixels_to_array(_header(pixel_format="yuv422"), img.tobytes())


def test_pixel_formats_become_rgb8():
    mono = np.full((2, 3), 7, np.uint8)
    assert to_rgb8(mono, "mono8").shape == (2, 3, 3)
    assert to_rgb8(np.full((2, 3), 0x1234, np.uint16), "mono16")[0, 0, 0] == 0x12
    bgr = np.zeros((1, 1, 3), np.uint8)
    bgr[..., 0] = 255
    assert to_rgb8(bgr, "bgr8")[0, 0, 2] == 255


@pytest.mark.parametrize("bad", ["", "..", "../etc", "a/b", "x" * 65, "sp ace"])
def test_names_that_would_escape_a_path_are_refused(bad):
    with pytest.raises(ProtocolError):
        valid_name(bad, "sku")


def test_text_fields_arrive_as_valid_unicode_whatever_the_file_name():
    """A non-UTF-8 file name reaches the wire surrogate-escaped; decoded, it is text a
    database and a note file take: undecodable bytes as \\xNN, other lone surrogates too."""
    name = os.fsdecode(b"/in/bad-\xff.png")
    v = Verdict("f1", "ERROR", camera="c", sku="s", line="l", capture_ts=1.0, origin=name,
                part_id=os.fsdecode(b"bad-\xff"), reason=f"cannot decode {name}")
    back = Verdict.decode(v.encode())
    assert back.origin == "/in/bad-\\xff.png" and back.part_id == "bad-\\xff"
    assert back.reason == "cannot decode /in/bad-\\xff.png"
    assert printable("plain ü") == "plain ü"
    assert printable("lone \ud800") == "lone \\ud800"
