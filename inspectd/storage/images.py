"""Frames on disk: NG (image, mask, overlay), ERROR frames, and a bounded OK sample for refit.

    <root>/ng/<sku>/<yyyy-mm-dd>/<frame_id>{.png,_mask.png,_overlay.jpg}
    <root>/error/<sku>/<yyyy-mm-dd>/<frame_id>.png
    <root>/ok/<sku>/<frame_id>.png            at most `ok_per_sku` per SKU, oldest dropped
    <root>/unjudged/<sku>/<frame_id>.png      frames of a SKU with no model yet (same bound):
                                              the pool a first refit for that SKU learns from

Every file is written under a temporary name in its directory, fsync'ed and renamed, so a
reader (or a crash) never sees half an image. The date is the capture day in UTC. NG and
ERROR day folders older than `ng_retention_days` are deleted (checked hourly).

Disk space goes to audit rows first: a free-space guard (`storage.disk`) stops OK and
unjudged samples below `min_free_ok` percent free, NG and ERROR images below
`min_free_images`; a write that fails for lack of space stops images until the next measure.
A frame whose image is not written keeps its audit row (without that path), and is counted
in `skipped`; `take_skipped()` hands the counts to the sink's metrics.
"""

from __future__ import annotations

import errno
import shutil
import time
from collections import Counter, OrderedDict
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import cv2
import numpy as np
import structlog

from inspectd.core import imaging
from inspectd.core.config import ImageSettings
from inspectd.core.wire import Verdict, valid_name
from inspectd.storage.disk import DiskGuard
from inspectd.storage.files import fsync_dir, write_atomic

log = structlog.get_logger("inspectd.images")

PRUNE_EVERY_S = 3600.0
SAMPLES = ("ok", "unjudged")  # bounded per SKU by ok_per_sku
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
SKIPPED = "image skipped: disk low ({kind})"  # the sink's drop reason


class ImageStore:
    def __init__(self, root: Path, settings: ImageSettings,
                 guard: DiskGuard | None = None) -> None:
        self.root = Path(root)
        self.settings = settings
        self.guard = guard or DiskGuard(self.root, settings.min_free_ok,
                                        settings.min_free_images)
        self.skipped: Counter[str] = Counter()  # images not written for lack of space, by kind
        self._untaken: Counter[str] = Counter()  # the part of `skipped` not yet taken
        # Per (kind, SKU), sample names oldest first: the bound holds without listing dirs.
        self._kept: dict[tuple[str, str], OrderedDict[str, None]] = {}
        for kind in SAMPLES:
            if (self.root / kind).is_dir():
                for d in (self.root / kind).iterdir():
                    if d.is_dir():
                        files = sorted(d.glob("*.png"),
                                       key=lambda p: (p.stat().st_mtime, p.name))
                        self._kept[kind, d.name] = OrderedDict.fromkeys(p.name for p in files)
        self._next_prune = 0.0

    def save_ng(self, v: Verdict, rgb: np.ndarray,
                amap: np.ndarray | None = None) -> dict[str, str]:
        """Image, mask and overlay of an NG frame; {} when saving NG frames is off."""
        if not self.settings.save_ng:
            return {}
        return self._save_reject("ng", v, rgb, amap)

    def save_error(self, v: Verdict, rgb: np.ndarray,
                   amap: np.ndarray | None = None) -> dict[str, str]:
        """The pixels of a frame judged ERROR (and mask/overlay when scored)."""
        if not self.settings.save_error:
            return {}
        return self._save_reject("error", v, rgb, amap)

    def save_ok(self, v: Verdict, rgb: np.ndarray) -> str | None:
        """Keep an OK frame for refit, dropping the SKU's oldest beyond `ok_per_sku`."""
        return self._save_sample("ok", v, rgb)

    def save_unjudged(self, v: Verdict, rgb: np.ndarray) -> str | None:
        """Keep a frame of a SKU that has no model yet, for its first refit (same bound)."""
        return self._save_sample("unjudged", v, rgb)

    def take_skipped(self) -> dict[str, int]:
        """Images skipped for lack of space since the last call, by drop reason."""
        taken = {SKIPPED.format(kind=k): n for k, n in self._untaken.items() if n}
        self._untaken.clear()
        return taken

    def _room(self, kind: str) -> bool:
        """May an image of `kind` be written? Counts it as skipped when not."""
        self._maybe_prune()
        if self.guard.allows(kind):
            return True
        self._skip(kind)
        return False

    def _skip(self, kind: str) -> None:
        self.skipped[kind] += 1
        self._untaken[kind] += 1

    def _write(self, path: Path, data: bytes) -> None:
        write_atomic(path, data)
        self.guard.wrote(len(data))

    def _maybe_prune(self) -> None:
        # Here, not after a write: with the disk low no reject is written, and old ones must
        # still go.
        if time.monotonic() >= self._next_prune:
            self._next_prune = time.monotonic() + PRUNE_EVERY_S
            self.prune()

    def _save_sample(self, kind: str, v: Verdict, rgb: np.ndarray) -> str | None:
        limit = self.settings.ok_per_sku
        if limit == 0:
            return None
        sku = valid_name(v.sku, "sku")
        name = valid_name(v.frame_id, "frame id") + ".png"
        if not self._room(kind):
            return None
        d = self.root / kind / sku
        try:
            d.mkdir(parents=True, exist_ok=True)
            self._write(d / name, _encode(".png", _bgr(rgb)))
            fsync_dir(d)
        except OSError as e:
            if e.errno not in NO_SPACE:
                raise
            self.guard.full()
            self._skip(kind)
            return None
        kept = self._kept.setdefault((kind, sku), OrderedDict())
        kept[name] = None
        kept.move_to_end(name)
        while len(kept) > limit:
            old, _ = kept.popitem(last=False)
            (d / old).unlink(missing_ok=True)
        return str(d / name)

    def prune(self, now: float | None = None) -> int:
        """Delete NG and ERROR day folders older than `ng_retention_days`; returns how many."""
        days = self.settings.ng_retention_days
        if days is None:
            return 0
        today = datetime.fromtimestamp(time.time() if now is None else now, UTC).date()
        oldest_kept = today - timedelta(days=days)
        removed = 0
        for kind in ("ng", "error"):
            for day_dir in self.root.glob(f"{kind}/*/*"):
                try:
                    day = date.fromisoformat(day_dir.name)
                except ValueError:
                    continue  # not ours
                if day < oldest_kept and day_dir.is_dir():
                    shutil.rmtree(day_dir, ignore_errors=True)
                    removed += 1
        if removed:
            log.info("pruned old reject images", days_kept=days, folders=removed)
        return removed

    def _save_reject(self, kind: str, v: Verdict, rgb: np.ndarray,
                     amap: np.ndarray | None) -> dict[str, str]:
        sku = valid_name(v.sku, "sku")
        fid = valid_name(v.frame_id, "frame id")
        if not self._room(kind):
            return {}
        ts = v.capture_ts if v.capture_ts > 0 else v.decided_ts
        d = self.root / kind / sku / datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d")
        files = [("image", d / f"{fid}.png", lambda: _encode(".png", _bgr(rgb)))]
        thr = v.pixel_threshold
        if amap is not None and thr is not None:
            files.append(("mask", d / f"{fid}_mask.png",
                          lambda: _encode(".png", (amap >= thr).astype(np.uint8) * 255)))
            files.append(("overlay", d / f"{fid}_overlay.jpg",
                          lambda: _encode(".jpg", imaging.overlay(rgb, amap, thr))))
        paths: dict[str, str] = {}
        try:
            d.mkdir(parents=True, exist_ok=True)
            for key, path, data in files:
                self._write(path, data())
                paths[key] = str(path)
            fsync_dir(d)
        except OSError as e:
            if e.errno not in NO_SPACE:
                raise
            # The row names what is on disk (the image, when only the mask did not fit).
            self.guard.full()
            self._skip(kind)
        return paths


def _bgr(rgb: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR)


def _encode(ext: str, img: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(ext, img)
    if not ok:
        raise ValueError(f"OpenCV could not encode a {img.shape} {img.dtype} image as {ext}")
    return buf.tobytes()
