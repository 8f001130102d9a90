"""Basler cameras through pypylon.

With `device_class` set only that transport layer is created and enumerated (no GigE
broadcast; `BaslerCamEmu` is the camera emulation, enabled by the PYLON_CAMEMU environment
variable). `GetArray()` returns a new array per frame, so the grab buffer is released at once.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from inspectd.core.config import PylonCamera
from inspectd.daemon.sources.base import (
    Capture,
    Lost,
    SourceBase,
    SourceError,
    fixed_sku,
    from_genicam,
    require_genicam_format,
)

RETRIEVE_TIMEOUT_MS = 200
PROBE_IDLE_S = 1.0  # no frame for this long: check the camera was not removed


def _load() -> tuple[Any, Any]:
    try:
        from pypylon import genicam, pylon
    except ImportError as e:
        raise SourceError(
            f"pylon cameras need pypylon: pip install inspectd[pylon] ({e})"
        ) from None
    return pylon, genicam


@dataclass
class _Session:
    camera: Any
    tl: Any  # the transport layer this source created, released last
    fmt: str
    serial: str


class PylonSource(SourceBase):
    kind = "pylon"

    def __init__(self, name: str, cfg: PylonCamera) -> None:
        super().__init__(name, cfg)
        self.sku = fixed_sku(name, cfg)
        self.pylon, self.genicam = _load()

    def _device(self) -> tuple[Any, Any]:
        pylon, cfg = self.pylon, self.cfg
        factory = pylon.TlFactory.GetInstance()
        if cfg.device_class:
            tl = factory.CreateTl(cfg.device_class)
            if tl is None:
                raise SourceError(f"cameras.{self.name}: no pylon transport {cfg.device_class}")
            infos = [d for d in tl.EnumerateDevices()
                     if cfg.serial is None or d.GetSerialNumber() == cfg.serial]
            if not infos:
                factory.ReleaseTl(tl)
                raise Lost(f"no {cfg.device_class} camera {cfg.serial or ''}".rstrip())
            return tl.CreateDevice(infos[0]), tl
        wanted = pylon.DeviceInfo()
        if cfg.serial:
            wanted.SetSerialNumber(cfg.serial)
        infos = factory.EnumerateDevices([wanted])
        if not infos:
            raise Lost(f"no camera {cfg.serial or ''}".rstrip())
        return factory.CreateDevice(infos[0]), None

    def _connect(self) -> _Session:
        pylon, genicam = self.pylon, self.genicam
        try:
            device, tl = self._device()
        except genicam.GenericException as e:
            raise self._error(e, "opening the camera") from None
        camera = pylon.InstantCamera(device)
        try:
            camera.Open()
            self._configure(camera)
            fmt = camera.PixelFormat.Value
            require_genicam_format(self.name, fmt)
            free = self.cfg.trigger == "free"
            # Free run: the newest frame, not a backlog; triggered: every frame, in order.
            camera.StartGrabbing(pylon.GrabStrategy_LatestImageOnly if free
                                 else pylon.GrabStrategy_OneByOne)
            serial = camera.GetDeviceInfo().GetSerialNumber()
        except (genicam.GenericException, SourceError) as e:
            self._release(camera, tl)
            if isinstance(e, SourceError):
                raise
            raise self._error(e, "setting up the camera") from None
        self.log.info("pylon camera open", serial=serial, pixel_format=fmt,
                      model=camera.GetDeviceInfo().GetModelName())
        return _Session(camera, tl, fmt, serial)

    def _error(self, e: Exception, what: str) -> Exception:
        """A GenICam error as Lost (camera gone) or SourceError (camera refuses the setting)."""
        g = self.genicam
        if isinstance(e, g.RuntimeException | g.TimeoutException):
            return Lost(f"{what}: {e}")
        return SourceError(f"cameras.{self.name}: {what}: {str(e).splitlines()[0]}")

    def _configure(self, camera: Any) -> None:
        cfg, nodes = self.cfg, camera.GetNodeMap()
        settings: list[tuple[str, Any]] = []
        if cfg.pixel_format:
            settings.append(("PixelFormat", cfg.pixel_format))
        if cfg.exposure_us:
            if self._writable(nodes, "ExposureAuto"):
                settings.append(("ExposureAuto", "Off"))
            modern = self._writable(nodes, "ExposureTime")  # SFNC 2; older GigE: ...Abs
            settings.append(("ExposureTime" if modern else "ExposureTimeAbs", cfg.exposure_us))
        if self._writable(nodes, "TriggerSelector"):
            settings.append(("TriggerSelector", "FrameStart"))
        if cfg.trigger == "free":
            settings.append(("TriggerMode", "Off"))
            if cfg.max_fps and self._writable(nodes, "AcquisitionFrameRateEnable"):
                rate = ("AcquisitionFrameRate" if self._writable(nodes, "AcquisitionFrameRate")
                        else "AcquisitionFrameRateAbs")
                settings += [("AcquisitionFrameRateEnable", True), (rate, cfg.max_fps)]
        else:
            source = "Software" if cfg.trigger == "software" else "Line1"
            settings += [("TriggerMode", "On"), ("TriggerSource", source)]
        for key, value in [*settings, *cfg.features.items()]:
            if not self._writable(nodes, key):
                raise SourceError(f"cameras.{self.name}: camera has no writable feature {key}")
            nodes.GetNode(key).Value = value

    def _writable(self, nodes: Any, key: str) -> bool:
        return bool(self.genicam.IsWritable(nodes.GetNode(key)))

    def _release(self, camera: Any, tl: Any) -> None:
        try:
            if camera.IsGrabbing():
                camera.StopGrabbing()
            camera.Close()
        except self.genicam.GenericException:
            pass
        camera.DestroyDevice()
        if tl is not None:
            self.pylon.TlFactory.GetInstance().ReleaseTl(tl)

    def _disconnect(self, s: _Session, lost: bool) -> None:
        self._release(s.camera, s.tl)

    def _grab(self, s: _Session) -> Iterator[Capture]:
        pylon, genicam, cam = self.pylon, self.genicam, s.camera
        software = self.cfg.trigger == "software"
        free = self.cfg.trigger == "free"
        triggered = False
        idle_since = time.monotonic()
        while not self.stopped():
            try:
                if software and not triggered:
                    if not self.pace():
                        return
                    if cam.WaitForFrameTriggerReady(1000, pylon.TimeoutHandling_Return):
                        cam.ExecuteSoftwareTrigger()
                        triggered = True
                result = cam.RetrieveResult(RETRIEVE_TIMEOUT_MS, pylon.TimeoutHandling_Return)
            except genicam.GenericException as e:
                raise self._error(e, "grabbing") from None
            if not result.IsValid():
                if cam.IsCameraDeviceRemoved():
                    raise Lost(f"camera {s.serial} removed")
                if time.monotonic() - idle_since > PROBE_IDLE_S:
                    idle_since = time.monotonic()
                    triggered = False  # a trigger that produced nothing: fire again
                continue
            idle_since = time.monotonic()
            triggered = False
            try:
                cap = self._capture(s, result, free)
            finally:
                result.Release()
            if cap is not None:
                yield cap

    def _capture(self, s: _Session, result: Any, free: bool) -> Capture | None:
        if free and self.pacer.interval:
            if self.pacer.delay() > 0:
                return None  # faster than max_fps (no frame rate feature): drop, don't queue
            self.pacer.mark()
        cap = Capture(None, "mono8", time.time(), sku=self.sku, part_id=str(result.BlockID),
                      origin=f"pylon:{s.serial}")
        if not result.GrabSucceeded():
            cap.error = (f"grab failed on camera {s.serial}: {result.GetErrorDescription()} "
                         f"({result.GetErrorCode():#x})")
            return cap
        cap.image, cap.pixel_format = from_genicam(s.fmt, result.GetArray())
        return cap
