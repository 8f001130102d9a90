"""Frame sources: a watched folder, OpenCV, Aravis (GigE Vision) and pylon behind one interface.

    source = open_source("cam1", settings.cameras["cam1"])
    for capture in source.frames(stop):      # blocks; reconnects on its own
        ...                                   # send capture.image, or audit capture.error
        if capture.done:                      # once the frame's outcome is known:
            capture.done(verdict, reason)     # folder: move, delete or quarantine the file
    source.close()

`frames` ends when `stop` is set or a finite source (a video file) ends. A lost camera or
stream is reopened with exponential backoff (reconnect_min_s … reconnect_max_s), logged with
the reason; a setting the device refuses raises SourceError.
"""

from __future__ import annotations

from inspectd.core.config import AravisCamera, FolderCamera, OpenCVCamera, PylonCamera
from inspectd.daemon.sources.base import Capture, Source, SourceError

__all__ = ["Capture", "Source", "SourceError", "open_source"]


def open_source(
    name: str, cfg: FolderCamera | OpenCVCamera | AravisCamera | PylonCamera
) -> Source:
    """The source for camera `name`, by `cfg.type`; SDKs are imported only when used."""
    if cfg.type == "folder":
        from inspectd.daemon.sources.folder import FolderSource

        return FolderSource(name, cfg)
    if cfg.type == "opencv":
        from inspectd.daemon.sources.opencv import OpenCVSource

        return OpenCVSource(name, cfg)
    if cfg.type == "aravis":
        from inspectd.daemon.sources.aravis import AravisSource

        return AravisSource(name, cfg)
    if cfg.type == "pylon":
        from inspectd.daemon.sources.pylon import PylonSource

        return PylonSource(name, cfg)
    raise SourceError(f"cameras.{name}: unknown camera type {cfg.type!r}")
