"""The wire format between roles: versioned JSON headers plus raw buffers (no socket code here).

Messages (ZeroMQ multipart, first part is the message type):

    acquire → worker   [b"frame",   FrameHeader JSON, pixels]
    acquire → sink     [b"announce", FrameHeader JSON]                  (deadline tracking)
    worker/acquire → sink  [b"verdict", Verdict JSON, (pixels, (anomaly map float16)?)?]

A frame's pixels travel as the raw C-contiguous buffer described by `shape`/`dtype`; the
verdict optionally carries the frame's pixels (NG frames, sampled OK frames) and, for scored
frames, the anomaly map at the frame's size as float16.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

import numpy as np

from inspectd.core.errors import InspectdError

VERSION = 1
FRAME, ANNOUNCE, VERDICT = b"frame", b"announce", b"verdict"
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
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def decode(cls, raw: bytes) -> FrameHeader:
        data = _load(raw, cls.__name__)
        try:
            h = cls(**data)
            h.shape = tuple(int(s) for s in h.shape)
        except (TypeError, ValueError) as e:
            raise ProtocolError(f"bad frame header: {e}") from None
        return h


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

    def encode(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def decode(cls, raw: bytes) -> Verdict:
        data = _load(raw, cls.__name__)
        known = {f.name for f in fields(cls)}
        try:
            v = cls(**{k: val for k, val in data.items() if k in known})
        except TypeError as e:
            raise ProtocolError(f"bad verdict: {e}") from None
        if v.shape is not None:
            v.shape = tuple(int(x) for x in v.shape)
        if v.verdict not in VERDICTS:
            raise ProtocolError(f"bad verdict kind {v.verdict!r}")
        return v

    @property
    def passed(self) -> bool:
        """Only OK passes; everything else is a reject."""
        return self.verdict == "OK"


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
