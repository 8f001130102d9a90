"""OpenCV VideoCapture as a camera: USB index, video file, RTSP/HTTP stream or image sequence.

A file or image sequence ends the source at its end (or starts over with `loop`); a live
device or stream that stops delivering is reopened with backoff.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import cv2

from inspectd.core.config import OpenCVCamera
from inspectd.daemon.sources.base import (
    Capture,
    Lost,
    SourceBase,
    SourceError,
    as_pixels,
    fixed_sku,
)

STREAM_TIMEOUT_MS = 10_000  # open/read timeout for network streams, so a dead one is noticed


class OpenCVSource(SourceBase):
    kind = "opencv"

    def __init__(self, name: str, cfg: OpenCVCamera) -> None:
        super().__init__(name, cfg)
        self.sku = fixed_sku(name, cfg)
        self.uri = cfg.uri
        self.stream = isinstance(self.uri, str) and "://" in self.uri
        self.live = isinstance(self.uri, int) or self.stream or str(self.uri).startswith("/dev/")
        # A file can wait for the line, unless paced (max_fps): then it plays a live camera.
        self.push_back = not self.live and cfg.max_fps is None
        if not self.live and "%" not in self.uri and not Path(self.uri).is_file():
            raise SourceError(f"cameras.{name}.uri: no video file {self.uri}")
        self.count = 0

    def _open(self) -> cv2.VideoCapture:
        if self.stream:
            cap = cv2.VideoCapture(self.uri, cv2.CAP_FFMPEG, [
                cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, STREAM_TIMEOUT_MS,
                cv2.CAP_PROP_READ_TIMEOUT_MSEC, STREAM_TIMEOUT_MS,
            ])
        else:
            cap = cv2.VideoCapture(self.uri)
        if not cap.isOpened():
            cap.release()
            if self.live:
                raise Lost(f"cannot open {self.uri}")
            raise SourceError(f"cameras.{self.name}: OpenCV cannot open {self.uri}")
        if self.live and self.cfg.width:
            cap.set(cv2.CAP_PROP_FRAME_WIDTH, self.cfg.width)
        if self.live and self.cfg.height:
            cap.set(cv2.CAP_PROP_FRAME_HEIGHT, self.cfg.height)
        return cap

    def _connect(self) -> list[cv2.VideoCapture]:
        return [self._open()]  # a box, so a looping file can swap in a reopened capture

    def _disconnect(self, box: list[cv2.VideoCapture], lost: bool) -> None:
        box[0].release()

    def _grab(self, box: list[cv2.VideoCapture]) -> Iterator[Capture]:
        in_pass = 0
        while self.pace():
            ok, frame = box[0].read()  # a new array per call: nothing is reused
            ts = time.time()
            if not ok:
                if self.live:
                    raise Lost(f"read from {self.uri} failed")
                if not self.cfg.loop or in_pass == 0:
                    self.log.info("video ended", uri=self.uri, frames=self.count)
                    return
                box[0].release()
                box[0] = self._open()
                in_pass = 0
                continue
            in_pass += 1
            self.count += 1
            cap = Capture(None, "bgr8", ts, sku=self.sku, part_id=str(self.count),
                          origin=str(self.uri))
            try:
                cap.image, cap.pixel_format = as_pixels(frame)
            except ValueError as e:
                cap.error = f"{self.uri} frame {self.count}: {e}"
            yield cap
