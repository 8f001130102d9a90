"""What every frame source shares: the Capture type, reconnect backoff, pacing, pixel layouts."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import cv2
import numpy as np
import structlog

from inspectd.core.errors import InspectdError

log = structlog.get_logger("inspectd.sources")


class SourceError(InspectdError):
    """A camera or folder that cannot be used as configured (missing SDK, bad setting)."""


class Lost(Exception):
    """The device or stream went away: reconnect after a backoff (internal to sources)."""


@dataclass
class Capture:
    """One frame, or one frame that could not be read (`error` set, `image` None).

    `image` is a buffer of its own (never reused by the source, possibly read-only), so it
    can be sent zero-copy. `capture_ts` is the wall clock when the frame was taken (a
    camera: when the source got it; a file: its modification time); `received_ts`, when
    set, is when the line first saw it, and its deadline counts from then (a file that
    waited in the folder is judged, not timed out for its age). `frame_id`, when set, is
    stable for the same input (a file seen again after a restart keeps its id). `done`,
    when set, is called with the frame's outcome (verdict, reason) once the sink has it.
    """

    image: np.ndarray | None
    pixel_format: str
    capture_ts: float
    sku: str | None = None
    part_id: str | None = None
    origin: str | None = None
    error: str | None = None
    done: Callable[[str, str | None], None] | None = None
    frame_id: str | None = None
    received_ts: float | None = None


class Source(Protocol):
    push_back: bool  # True: frames can wait (files); False: a live camera, never blocked

    def frames(self, stop: threading.Event) -> Iterator[Capture]: ...

    def close(self) -> None: ...


class Backoff:
    """Exponential reconnect delays from `low` to `high` seconds."""

    def __init__(self, low: float, high: float) -> None:
        self.low, self.high = low, max(low, high)
        self._next = low

    def next(self) -> float:
        delay, self._next = self._next, min(self._next * 2, self.high)
        return delay

    def reset(self) -> None:
        self._next = self.low


class Pacer:
    """At most `max_fps` frames a second: `delay()` until the next is due; `mark()` one taken."""

    def __init__(self, max_fps: float | None) -> None:
        self.interval = 1.0 / max_fps if max_fps else 0.0
        self._due = 0.0

    def delay(self) -> float:
        return max(0.0, self._due - time.monotonic())

    def mark(self) -> None:
        # Schedule from the previous due time so lateness does not accumulate into a lower
        # rate; after a long stall, start afresh instead of bursting to catch up.
        now = time.monotonic()
        self._due = max(self._due + self.interval, now)


class SourceBase:
    """Connect, grab until lost or ended, reconnect with backoff; subclasses do the device part.

    `_connect()` returns a handle or raises Lost; `_grab(handle)` yields captures, raises Lost
    when the device goes away and returns when stopped or at the end of a finite source;
    `_disconnect(handle, lost)` releases it without blocking on a dead device.
    """

    kind = ""
    push_back = False

    def __init__(self, name: str, cfg: Any) -> None:
        self.name, self.cfg = name, cfg
        self.log = log.bind(camera=name, source=self.kind)
        self.pacer = Pacer(cfg.max_fps)
        self._stop = threading.Event()
        self._halt = threading.Event()
        self._gen: Iterator[Capture] | None = None

    def frames(self, stop: threading.Event) -> Iterator[Capture]:
        self._stop = stop
        self._gen = self._frames()
        return self._gen

    def close(self) -> None:
        self._halt.set()
        gen, self._gen = self._gen, None
        if gen is not None:
            try:
                gen.close()  # type: ignore[attr-defined]
            except ValueError:
                pass  # running in another thread: it sees _halt within a poll interval

    def stopped(self) -> bool:
        return self._stop.is_set() or self._halt.is_set()

    def sleep(self, seconds: float) -> bool:
        """Sleep unless stopped first; True when it slept the whole time."""
        end = time.monotonic() + seconds
        while not self.stopped():
            left = end - time.monotonic()
            if left <= 0:
                return True
            self._stop.wait(min(left, 0.1))
        return False

    def pace(self) -> bool:
        """Wait for the next frame slot (max_fps); False when stopped meanwhile."""
        if not self.sleep(self.pacer.delay()):
            return False
        self.pacer.mark()
        return True

    def _frames(self) -> Iterator[Capture]:
        backoff = Backoff(self.cfg.reconnect_min_s, self.cfg.reconnect_max_s)
        while not self.stopped():
            try:
                handle = self._connect()
            except Lost as e:
                reason = f"cannot connect: {e}"
            else:
                self.log.info("source connected")
                lost = False
                try:
                    for cap in self._grab(handle):
                        if cap.error is None:
                            backoff.reset()
                        yield cap
                    return
                except Lost as e:
                    lost, reason = True, str(e)
                finally:
                    self._disconnect(handle, lost)
            delay = backoff.next()
            self.log.warning("source lost, reconnecting", reason=reason, retry_in_s=delay)
            self.sleep(delay)

    def _connect(self) -> Any:
        raise NotImplementedError

    def _grab(self, handle: Any) -> Iterator[Capture]:
        raise NotImplementedError

    def _disconnect(self, handle: Any, lost: bool) -> None:
        raise NotImplementedError


def fixed_sku(name: str, cfg: Any) -> str:
    """A camera's SKU; sku_pattern only has a file path to match in folder sources."""
    if cfg.sku is None:
        raise SourceError(f"cameras.{name}: sku_pattern needs file names (folder cameras); set sku")
    return cfg.sku


def as_pixels(img: np.ndarray) -> tuple[np.ndarray, str]:
    """An OpenCV image (gray, BGR or BGRA; 8 or 16 bit) as a C-contiguous array and its format.

    Alpha is dropped; 16-bit colour becomes 8-bit because the wire knows no 16-bit colour.
    Raises ValueError naming what is unsupported.
    """
    if img.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"unsupported pixel type {img.dtype}")
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    elif img.ndim == 3 and img.shape[2] in (3, 4):
        img = img[:, :, :3]
        if img.dtype == np.uint16:
            img = (img >> 8).astype(np.uint8)
    elif img.ndim != 2:
        raise ValueError(f"unsupported image shape {img.shape}")
    if img.ndim == 2:
        fmt = "mono8" if img.dtype == np.uint8 else "mono16"
    else:
        fmt = "bgr8"
    return np.ascontiguousarray(img), fmt


# GenICam PixelFormat → (channels, significant bits, wire format, OpenCV demosaic code or None).
_BAYER = {"RG": cv2.COLOR_BayerRGGB2BGR, "BG": cv2.COLOR_BayerBGGR2BGR,
          "GR": cv2.COLOR_BayerGRBG2BGR, "GB": cv2.COLOR_BayerGBRG2BGR}
GENICAM_FORMATS: dict[str, tuple[int, int, str, int | None]] = {
    "Mono8": (1, 8, "mono8", None),
    **{f"Mono{b}": (1, b, "mono16", None) for b in (10, 12, 14, 16)},
    "RGB8": (3, 8, "rgb8", None), "RGB8Packed": (3, 8, "rgb8", None),
    "BGR8": (3, 8, "bgr8", None), "BGR8Packed": (3, 8, "bgr8", None),
    **{f"Bayer{p}8": (1, 8, "bgr8", code) for p, code in _BAYER.items()},
}


def genicam_dtype(fmt: str) -> tuple[int, type]:
    """Channels and numpy dtype of a supported GenICam pixel format's unpacked buffer."""
    channels, bits, _, _ = GENICAM_FORMATS[fmt]
    return channels, np.uint8 if bits == 8 else np.uint16


def from_genicam(fmt: str, raw: np.ndarray) -> tuple[np.ndarray, str]:
    """A camera buffer (H×W or H×W×3, unpacked) as wire pixels: Bayer demosaiced to BGR,
    10–14 bit mono scaled to the full 16-bit range (so mono16 means the same everywhere)."""
    _, bits, wire, demosaic = GENICAM_FORMATS[fmt]
    if demosaic is not None:
        return cv2.cvtColor(raw, demosaic), wire
    if 8 < bits < 16:
        raw = raw << (16 - bits)
    return np.ascontiguousarray(raw), wire


def require_genicam_format(name: str, fmt: str) -> None:
    if fmt not in GENICAM_FORMATS:
        raise SourceError(
            f"cameras.{name}: pixel format {fmt} not supported; set pixel_format to one of "
            f"{', '.join(GENICAM_FORMATS)}"
        )
