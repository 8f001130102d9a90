"""GigE Vision cameras through Aravis 0.8 (PyGObject).

The camera is opened by IP address only: Aravis then talks to that address alone, while
opening by id or listing devices broadcasts discovery on every interface. Each buffer's
pixels are copied out (`get_image_data` returns new bytes) and the buffer goes straight back
to the stream. Loss is noticed from the heartbeat (`control-lost`) or, sooner, by reading a
bootstrap register whenever no frame came for a second (a rebooted camera answers, but
no longer counts us as its controller).
"""

from __future__ import annotations

import ipaddress
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from inspectd.core.config import AravisCamera
from inspectd.daemon.sources.base import (
    Capture,
    Lost,
    SourceBase,
    SourceError,
    fixed_sku,
    from_genicam,
    genicam_dtype,
    require_genicam_format,
)

POP_TIMEOUT_US = 200_000
PROBE_IDLE_S = 1.0  # no frame for this long: check the camera still answers
GVCP_CCP = 0x0A00  # bootstrap register Control Channel Privilege: 0 after a camera reboot
# Aravis device errors that mean the camera is gone rather than misconfigured.
_LOST_CODES = ("NOT_CONNECTED", "PROTOCOL_ERROR", "TRANSFER_ERROR", "TIMEOUT", "NOT_CONTROLLER",
               "PROTOCOL_ERROR_BUSY")


def _load() -> tuple[Any, Any]:
    try:
        import gi

        gi.require_version("Aravis", "0.8")
        from gi.repository import Aravis, GLib
    except (ImportError, ValueError) as e:
        raise SourceError(
            f"aravis cameras need PyGObject and the Aravis 0.8 typelib: pip install "
            f"inspectd[aravis] and apt-get install gir1.2-aravis-0.8 ({e})"
        ) from None
    return Aravis, GLib


@dataclass
class _Session:
    camera: Any
    stream: Any
    lost: threading.Event
    fmt: str
    serial: str


class AravisSource(SourceBase):
    kind = "aravis"

    def __init__(self, name: str, cfg: AravisCamera) -> None:
        super().__init__(name, cfg)
        self.sku = fixed_sku(name, cfg)
        try:
            ipaddress.ip_address(cfg.device)
        except ValueError:
            raise SourceError(
                f"cameras.{name}.device {cfg.device!r}: give the camera's IP address (opening "
                "by id needs discovery, which broadcasts on every interface)"
            ) from None
        self.Arv, self.GLib = _load()

    def _error(self, e: Any, what: str) -> Exception:
        """A GLib error as Lost (camera gone) or SourceError (camera refuses the setting)."""
        lost = {int(getattr(self.Arv.DeviceError, c)) for c in _LOST_CODES}
        if e.domain == "arv-device-error-quark" and e.code in lost:
            return Lost(f"{what}: {e.message}")
        return SourceError(f"cameras.{self.name}: {what}: {e.message}")

    def _connect(self) -> _Session:
        Arv, GLib = self.Arv, self.GLib
        try:
            camera = Arv.Camera.new(self.cfg.device)
        except GLib.Error as e:
            raise Lost(e.message) from None
        lost = threading.Event()
        camera.get_device().connect("control-lost", lambda _dev: lost.set())
        error: Exception | None = None
        try:
            session = self._start(camera, lost)
        except GLib.Error as e:
            error = self._error(e, "setting up the camera")
        except SourceError as e:
            error = e.with_traceback(None)
        if error is not None:
            # Release the camera now, while it answers: finalising it later, once it is gone,
            # blocks the whole process for seconds. So no traceback may keep it alive.
            camera = None
            raise error
        self.log.info("aravis camera open", address=self.cfg.device, serial=session.serial,
                      model=camera.get_model_name(), pixel_format=session.fmt)
        return session

    def _start(self, camera: Any, lost: threading.Event) -> _Session:
        self._configure(camera)
        fmt = camera.get_pixel_format_as_string()
        require_genicam_format(self.name, fmt)
        stream = camera.create_stream(None, None)
        payload = camera.get_payload()
        for _ in range(self.cfg.buffers):
            stream.push_buffer(self.Arv.Buffer.new_allocate(payload))
        camera.start_acquisition()
        serial = camera.get_device_serial_number() or self.cfg.device
        return _Session(camera, stream, lost, fmt, serial)

    def _configure(self, camera: Any) -> None:
        Arv, cfg = self.Arv, self.cfg
        if cfg.pixel_format:
            camera.set_pixel_format_from_string(cfg.pixel_format)
        if cfg.exposure_us:
            if camera.is_exposure_auto_available():
                camera.set_exposure_time_auto(Arv.Auto.OFF)
            camera.set_exposure_time(cfg.exposure_us)
        camera.set_acquisition_mode(Arv.AcquisitionMode.CONTINUOUS)
        if cfg.trigger == "free":
            camera.clear_triggers()
            if cfg.max_fps and camera.is_frame_rate_available():
                camera.set_frame_rate(cfg.max_fps)
        elif cfg.trigger == "software":
            camera.set_trigger("Software")
        else:
            lines = [s for s in camera.dup_available_trigger_sources() if s.startswith("Line")]
            if not lines:
                raise SourceError(f"cameras.{self.name}: camera has no Line trigger source")
            camera.set_trigger(sorted(lines)[0])
        device = camera.get_device()
        for key, value in cfg.features.items():
            if isinstance(value, bool):
                device.set_boolean_feature_value(key, value)
            elif isinstance(value, int):
                device.set_integer_feature_value(key, value)
            elif isinstance(value, float):
                device.set_float_feature_value(key, value)
            else:
                device.set_string_feature_value(key, value)

    def _disconnect(self, s: _Session, lost: bool) -> None:
        if not lost and not s.lost.is_set():
            try:
                s.camera.stop_acquisition()
            except self.GLib.Error:
                pass
        # Dropping the last references ends the stream thread, the heartbeat and the handler.
        s.stream = s.camera = None

    def _probe(self, s: _Session) -> None:
        try:
            privilege = s.camera.get_device().read_register(GVCP_CCP)
        except self.GLib.Error as e:
            raise Lost(f"camera not answering: {e.message}") from None
        if not privilege & 0x3:
            raise Lost("camera no longer grants us control (restarted?)")

    def _grab(self, s: _Session) -> Iterator[Capture]:
        software = self.cfg.trigger == "software"
        free = self.cfg.trigger == "free"
        triggered = False
        idle_since = time.monotonic()
        while not self.stopped():
            if s.lost.is_set():
                raise Lost("control lost (heartbeat failed)")
            if software and not triggered:
                if not self.pace():
                    return
                try:
                    s.camera.software_trigger()
                except self.GLib.Error as e:
                    raise self._error(e, "software trigger") from None
                triggered = True
            buf = s.stream.timeout_pop_buffer(POP_TIMEOUT_US)
            if buf is None:
                if time.monotonic() - idle_since > PROBE_IDLE_S:
                    self._probe(s)
                    idle_since = time.monotonic()
                    triggered = False  # a trigger that produced nothing: fire again
                continue
            idle_since = time.monotonic()
            triggered = False
            try:
                cap = self._capture(s, buf, free)
            finally:
                s.stream.push_buffer(buf)
            if cap is not None:
                yield cap

    def _capture(self, s: _Session, buf: Any, free: bool) -> Capture | None:
        Arv = self.Arv
        status = buf.get_status()
        if status in (Arv.BufferStatus.ABORTED, Arv.BufferStatus.CLEARED):
            return None
        if free and self.pacer.interval:
            # The camera runs free faster than max_fps: drop instead of queueing stale frames.
            if self.pacer.delay() > 0:
                return None
            self.pacer.mark()
        cap = Capture(None, "mono8", time.time(), sku=self.sku,
                      part_id=str(buf.get_frame_id()), origin=f"aravis:{s.serial}")
        if status != Arv.BufferStatus.SUCCESS:
            cap.error = f"incomplete frame from camera {s.serial}: {status.value_nick}"
            return cap
        width, height = buf.get_image_width(), buf.get_image_height()
        channels, dtype = genicam_dtype(s.fmt)
        row = width * channels * np.dtype(dtype).itemsize
        stride = row + buf.get_image_padding()[0]
        need = stride * (height - 1) + row
        data = buf.get_image_data()  # new bytes: the frame's own copy
        if not data or len(data) < need:
            got = len(data or b"")
            cap.error = f"short frame from camera {s.serial}: {got} bytes, {s.fmt} needs {need}"
            return cap
        raw = np.frombuffer(data, np.uint8, count=need)
        if stride != row:  # line padding: keep each line's pixels only
            raw = np.lib.stride_tricks.as_strided(raw, (height, row), (stride, 1)).copy()
        shape = (height, width) if channels == 1 else (height, width, channels)
        cap.image, cap.pixel_format = from_genicam(s.fmt, raw.view(dtype).reshape(shape))
        return cap
