"""The wire format between roles: versioned JSON headers plus raw buffers (no socket code here).

Messages (ZeroMQ multipart, first part is the message type):

    acquire → sink     [b"announce", FrameHeader JSON]       journaled, then acknowledged
    acquire → sink     [b"judged", Verdict JSON]             a frame acquisition judged itself
                                                             (unreadable, shed): announce and
                                                             verdict in one, acknowledged
    sink → acquire     [b"ack", Ack JSON]                    announcements the sink holds, and
                                                             the outcome of frames it judged
    acquire → worker   [b"frame", FrameHeader JSON, pixels]  only once the sink holds it
    worker → sink      [b"verdict", Verdict JSON, (pixels, (anomaly map float16)?)?]
    worker → sink      [b"status", Status JSON]              queue depth and service times

A frame's pixels travel as the raw C-contiguous buffer described by `shape`/`dtype`; the
verdict optionally carries the frame's pixels (NG frames, sampled OK frames) and, for scored
frames, the anomaly map at the frame's size as float16. Every JSON part is type-checked on
decode: a malformed message is a ProtocolError, never a crash.
"""

from __future__ import annotations

import json
import math
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from inspectd.core.errors import InspectdError

VERSION = 1
FRAME, ANNOUNCE, VERDICT = b"frame", b"announce", b"verdict"
JUDGED, ACK, STATUS = b"judged", b"ack", b"status"
VerdictKind = Literal["OK", "NG", "ERROR", "TIMEOUT"]
VERDICTS: tuple[VerdictKind, ...] = ("OK", "NG", "ERROR", "TIMEOUT")
PIXEL_FORMATS = ("mono8", "rgb8", "bgr8", "mono16")
UNKNOWN_SKU = "unknown SKU"  # reason prefix of ERROR verdicts for SKUs without a model
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


class ProtocolError(InspectdError):
    """A message that does not follow this wire format (corrupt, truncated, wrong version)."""


def valid_name(value: str, what: str = "name") -> str:
    """SKU and camera names become path parts and topics: `[A-Za-z0-9_.-]{1,64}`, not dots only."""
    if not isinstance(value, str) or not _NAME.fullmatch(value) or set(value) == {"."}:
        raise ProtocolError(f"invalid {what} {value!r}: expected [A-Za-z0-9_.-]{{1,64}}")
    return value


def _fields(message: object) -> dict[str, Any]:
    """A flat message's fields, shallow: `dataclasses.asdict` deep-copies every value, and on
    the per-frame path (encode, journal, audit row, event) that was a third of the sink's CPU."""
    return dict(vars(message))


def new_frame_id() -> str:
    return uuid.uuid4().hex


@dataclass
class FrameHeader:
    frame_id: str
    camera: str
    sku: str
    capture_ts: float  # wall clock, seconds since the epoch
    deadline_ts: float  # verdict needed by then, else TIMEOUT
    shape: tuple[int, ...]
    dtype: str
    pixel_format: str
    part_id: str | None = None
    line: str = ""
    origin: str | None = None  # file path, camera serial, stream URL … for the audit log
    v: int = VERSION

    def encode(self) -> bytes:
        return json.dumps(_fields(self), separators=(",", ":")).encode()

    @classmethod
    def decode(cls, raw: bytes) -> FrameHeader:
        data = _load(raw, cls.__name__)
        unknown = set(data) - set(_HEADER_FIELDS)
        if unknown:
            raise ProtocolError(f"bad frame header: unknown fields {sorted(unknown)}")
        return _build(cls, _checked(data, _HEADER_FIELDS, "frame header"), "frame header")


@dataclass
class Verdict:
    """One frame's outcome. Exactly one reaches the audit log per frame id."""

    frame_id: str
    verdict: VerdictKind
    camera: str = ""
    sku: str = ""
    line: str = ""
    part_id: str | None = None
    origin: str | None = None
    capture_ts: float = 0.0
    deadline_ts: float = 0.0
    decided_ts: float = field(default_factory=time.time)
    reason: str | None = None
    score: float | None = None
    threshold: float | None = None
    pixel_threshold: float | None = None
    model_version: str | None = None
    image_sha256: str | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)  # queue, decode, infer, total
    # Describe the pixels a verdict message may carry (NG frames, sampled OK frames).
    shape: tuple[int, ...] | None = None
    dtype: str | None = None
    pixel_format: str | None = None
    v: int = VERSION

    @classmethod
    def for_frame(cls, h: FrameHeader, verdict: VerdictKind, reason: str | None = None,
                  **kw: Any) -> Verdict:
        return cls(frame_id=h.frame_id, verdict=verdict, camera=h.camera, sku=h.sku,
                   line=h.line, part_id=h.part_id, origin=h.origin, capture_ts=h.capture_ts,
                   deadline_ts=h.deadline_ts, reason=reason, shape=h.shape, dtype=h.dtype,
                   pixel_format=h.pixel_format, **kw)

    def as_dict(self) -> dict[str, Any]:
        return _fields(self)

    def encode(self) -> bytes:
        return json.dumps(_fields(self), separators=(",", ":")).encode()

    @classmethod
    def decode(cls, raw: bytes) -> Verdict:
        """Fields this build does not know are ignored (a newer peer); every known field is
        type-checked, so a malformed verdict is a ProtocolError, never a crash or a row."""
        data = _load(raw, cls.__name__)
        known = {k: val for k, val in data.items() if k in _VERDICT_FIELDS}
        return _build(cls, _checked(known, _VERDICT_FIELDS, "verdict"), "verdict")

    @property
    def passed(self) -> bool:
        """Only OK passes; everything else is a reject."""
        return self.verdict == "OK"


@dataclass
class Ack:
    """The sink to one acquisition: `held` frame ids it journaled (or already tracks), and
    `judged` frame id → (verdict, reason) for frames of that acquisition it has judged."""

    held: list[str] = field(default_factory=list)
    judged: dict[str, tuple[str, str | None]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.held or self.judged)

    def encode(self) -> bytes:
        return json.dumps({"held": self.held, "judged": self.judged, "v": VERSION},
                          separators=(",", ":")).encode()

    @classmethod
    def decode(cls, raw: bytes) -> Ack:
        data = _load(raw, cls.__name__)
        held, judged = data.get("held", []), data.get("judged", {})
        if not isinstance(held, list) or not isinstance(judged, dict):
            raise ProtocolError("bad ack: held must be a list, judged a mapping")
        try:
            return cls([_id(f) for f in held],
                       {_id(f): (_one_of(*VERDICTS)(r[0]), _optional(_text)(r[1]))
                        for f, r in judged.items()})
        except (ValueError, TypeError, IndexError, KeyError) as e:
            raise ProtocolError(f"bad ack: {e}") from None


@dataclass
class Status:
    """A role's live figures for the sink's metrics: `queue` frames waiting in it (a worker's
    queue; frames held at acquisition), `unsent` messages it could not send so far (the
    sink not reading), and for a worker its measured service time per SKU (ms for a batch
    of `max_batch`)."""

    role: str
    name: str
    queue: int
    service_ms: dict[str, float] = field(default_factory=dict)
    unsent: int = 0

    def encode(self) -> bytes:
        return json.dumps({**_fields(self), "v": VERSION}, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, raw: bytes) -> Status:
        data = _load(raw, cls.__name__)
        try:
            queue, unsent = data["queue"], data.get("unsent", 0)
            for n in (queue, unsent):
                if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                    raise ValueError("queue, unsent: expected counts")
            return cls(_one_of("acquire", "worker")(data["role"]), _text(data["name"]), queue,
                       {valid_name(k): _number(v) for k, v in data.get("service_ms", {}).items()},
                       unsent)
        except (ValueError, TypeError, KeyError, AttributeError, ProtocolError) as e:
            raise ProtocolError(f"bad status: {e}") from None


# -- field checks: JSON from another process is untrusted until every field has its type ----
_TEXT_MAX = 4096
_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def _id(v: Any) -> str:
    if not isinstance(v, str) or not _ID.fullmatch(v):
        raise ValueError("expected [A-Za-z0-9_.-]{1,64}")
    return v


def printable(text: str) -> str:
    """`text` as valid Unicode: a file name's undecodable bytes (surrogate-escaped by
    os.fsdecode) become `\\xff` escapes, any other lone surrogate `\\udcxx`. A database or
    a text file refuses lone surrogates, and a row or a quarantine note must never be lost
    to a file's name."""
    try:
        text.encode()
        return text
    except UnicodeEncodeError:
        pass
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode()


def _text(v: Any) -> str:
    if not isinstance(v, str) or len(v) > _TEXT_MAX:
        raise ValueError(f"expected a string of at most {_TEXT_MAX} characters")
    return printable(v)


def _name_or_empty(v: Any) -> str:
    return v if v == "" else valid_name(v)


def _number(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise ValueError("expected a finite number")
    return float(v)


def _shape(v: Any) -> tuple[int, ...]:
    if not isinstance(v, list | tuple) or not 2 <= len(v) <= 3 or not all(
            isinstance(d, int) and not isinstance(d, bool) and 0 < d < 2**31 for d in v):
        raise ValueError("expected 2 or 3 positive integers")
    return tuple(v)


def _one_of(*choices: str) -> Callable[[Any], str]:
    def check(v: Any) -> str:
        if v not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}")
        return v
    return check


def _timings(v: Any) -> dict[str, float]:
    if not isinstance(v, dict) or len(v) > 16:
        raise ValueError("expected a mapping of at most 16 timings")
    return {_text(k): _number(x) for k, x in v.items()}


def _version(v: Any) -> int:
    if v != VERSION:
        raise ValueError(f"this build speaks {VERSION}")
    return v


def _optional(check: Callable[[Any], Any]) -> Callable[[Any], Any]:
    return lambda v: None if v is None else check(v)


_HEADER_FIELDS: dict[str, Callable[[Any], Any]] = {
    "frame_id": _id, "camera": valid_name, "sku": valid_name, "capture_ts": _number,
    "deadline_ts": _number, "shape": _shape, "dtype": _one_of("uint8", "uint16"),
    "pixel_format": _one_of(*PIXEL_FORMATS), "part_id": _optional(_text), "line": _text,
    "origin": _optional(_text), "v": _version,
}
_VERDICT_FIELDS: dict[str, Callable[[Any], Any]] = {
    "frame_id": _id, "verdict": _one_of(*VERDICTS), "camera": _name_or_empty,
    "sku": _text, "line": _text, "part_id": _optional(_text), "origin": _optional(_text),
    "capture_ts": _number, "deadline_ts": _number, "decided_ts": _number,
    "reason": _optional(_text), "score": _optional(_number), "threshold": _optional(_number),
    "pixel_threshold": _optional(_number), "model_version": _optional(_text),
    "image_sha256": _optional(_text), "timings_ms": _timings, "shape": _optional(_shape),
    "dtype": _optional(_one_of("uint8", "uint16")),
    "pixel_format": _optional(_one_of(*PIXEL_FORMATS)), "v": _version,
}


def _checked(data: dict[str, Any], spec: dict[str, Callable[[Any], Any]],
             what: str) -> dict[str, Any]:
    out = {}
    for key, value in data.items():
        try:
            out[key] = spec[key](value)
        except (ValueError, TypeError, ProtocolError) as e:
            raise ProtocolError(f"bad {what}: {key} {_short(value)}: {e}") from None
    return out


def _build(cls: Any, fields: dict[str, Any], what: str) -> Any:
    try:
        return cls(**fields)
    except TypeError as e:  # a required field is missing
        raise ProtocolError(f"bad {what}: {e}") from None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _load(raw: bytes, what: str) -> dict[str, Any]:
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ProtocolError(f"{what} is not JSON: {e}") from None
    if not isinstance(data, dict):
        raise ProtocolError(f"{what} is not a JSON object")
    if data.get("v") != VERSION:
        raise ProtocolError(f"{what} version {data.get('v')!r}, this build speaks {VERSION}")
    return data


def pixels_to_array(h: FrameHeader | Verdict, buf: memoryview | bytes) -> np.ndarray:
    """The frame's pixels as an array (zero-copy view); ProtocolError when they do not fit."""
    if h.shape is None or h.dtype is None:
        raise ProtocolError("no pixel description")
    if h.dtype not in ("uint8", "uint16"):
        raise ProtocolError(f"unsupported dtype {h.dtype!r}")
    if h.pixel_format not in PIXEL_FORMATS:
        raise ProtocolError(f"unsupported pixel format {h.pixel_format!r}")
    if not 2 <= len(h.shape) <= 3 or min(h.shape) < 1:
        raise ProtocolError(f"bad shape {h.shape}")
    need = int(np.prod(h.shape)) * np.dtype(h.dtype).itemsize
    if len(memoryview(buf)) != need:
        raise ProtocolError(
            f"pixel buffer has {len(memoryview(buf))} bytes, shape {list(h.shape)} "
            f"{h.dtype} needs {need}"
        )
    return np.frombuffer(buf, dtype=h.dtype).reshape(h.shape)


def to_rgb8(img: np.ndarray, pixel_format: str) -> np.ndarray:
    """Any supported pixel format → H×W×3 uint8 RGB, which the models take."""
    if pixel_format == "mono16":
        img = (img >> 8).astype(np.uint8)
    if img.ndim == 2 or (img.ndim == 3 and img.shape[2] == 1):
        return np.repeat(img.reshape(img.shape[0], img.shape[1], 1), 3, axis=2)
    if img.shape[2] != 3:
        raise ProtocolError(f"expected 3 channels for {pixel_format}, got {img.shape[2]}")
    return img[..., ::-1] if pixel_format == "bgr8" else img
