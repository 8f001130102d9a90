"""Frame sources against real peers: inotify on tmp folders, OpenCV files, the Aravis fake
GigE Vision camera on 127.0.0.1 and the pylon camera emulation."""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
from structlog.testing import capture_logs

from inspectd.core.config import AravisCamera, FolderCamera, OpenCVCamera, PylonCamera
from inspectd.daemon.sources import Capture, Source, SourceError, open_source
from inspectd.daemon.sources import folder as folder_mod

QUIET_S = 0.4  # how long "nothing more arrives" is watched


class Collector:
    """Runs a source's frames() in a thread; done() after each with the outcome the sink
    would give: OK for a frame, ERROR for one the source could not read."""

    def __init__(self, source: Source) -> None:
        self.source, self.stop = source, threading.Event()
        self.q: queue.Queue[Capture | BaseException | None] = queue.Queue()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for cap in self.source.frames(self.stop):
                if cap.done is not None:
                    cap.done("ERROR" if cap.error else "OK", cap.error)
                self.q.put(cap)
        except BaseException as e:  # handed to the test thread
            self.q.put(e)
        self.q.put(None)

    def take(self, n: int, timeout: float = 15.0) -> list[Capture]:
        caps: list[Capture] = []
        end = time.monotonic() + timeout
        while len(caps) < n:
            try:
                item = self.q.get(timeout=max(0.01, end - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"got {len(caps)} of {n} frames") from None
            if isinstance(item, BaseException):
                raise item
            if item is None:
                raise AssertionError(f"source ended after {len(caps)} of {n} frames")
            caps.append(item)
        return caps

    def nothing_more(self) -> None:
        time.sleep(QUIET_S)
        assert self.q.empty(), f"unexpected {self.q.get()}"

    def ended(self, timeout: float = 10.0) -> bool:
        self.thread.join(timeout)
        return not self.thread.is_alive()

    def close(self) -> None:
        self.stop.set()
        self.source.close()
        self.thread.join(10)
        assert not self.thread.is_alive(), "source did not stop"


@pytest.fixture
def collect() -> Iterator:
    started: list[Collector] = []

    def start(source: Source) -> Collector:
        started.append(Collector(source))
        return started[-1]

    yield start
    for c in started:
        c.close()


def png_bytes(img: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", img)
    assert ok
    return buf.tobytes()


def noise(h: int, w: int, seed: int, channels: int = 3) -> np.ndarray:
    shape = (h, w, channels) if channels > 1 else (h, w)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def folder_cam(path: Path, **kw) -> FolderCamera:
    kw.setdefault("sku", "widget")
    return FolderCamera(type="folder", path=path, existing=kw.pop("existing", False),
                        reconnect_min_s=0.1, **kw)


# --- folder -----------------------------------------------------------------------------


def test_folder_delivers_written_and_moved_in_files_once_and_complete(tmp_path, collect):
    watched, outside = tmp_path / "in", tmp_path / "outside"
    watched.mkdir()
    outside.mkdir()
    c = collect(open_source("cam", folder_cam(watched, after="keep")))
    time.sleep(0.3)  # observer running
    big, moved, renamed = noise(600, 800, 1), noise(40, 50, 2), noise(30, 20, 3, channels=1)

    data = png_bytes(big)  # ~1.4 MB written slowly: never read half-written
    with open(watched / "big.png", "wb") as f:
        for i in range(0, len(data), len(data) // 8 + 1):
            f.write(data[i:i + len(data) // 8 + 1])
            f.flush()
            time.sleep(0.03)
    (outside / "moved.png").write_bytes(png_bytes(moved))
    os.rename(outside / "moved.png", watched / "moved.png")
    (watched / "renamed.png.tmp").write_bytes(png_bytes(renamed))
    os.rename(watched / "renamed.png.tmp", watched / "renamed.png")

    caps = {Path(cap.origin).name: cap for cap in c.take(3)}
    c.nothing_more()
    assert sorted(caps) == ["big.png", "moved.png", "renamed.png"]
    assert np.array_equal(caps["big.png"].image, big) and caps["big.png"].pixel_format == "bgr8"
    assert np.array_equal(caps["moved.png"].image, moved)
    assert np.array_equal(caps["renamed.png"].image, renamed)
    assert caps["renamed.png"].pixel_format == "mono8"
    assert all(cap.sku == "widget" and cap.error is None for cap in caps.values())
    assert caps["big.png"].part_id == "big" and caps["big.png"].image.flags.c_contiguous


def test_folder_ignores_temp_dot_and_unmatched_files(tmp_path, collect):
    c = collect(open_source("cam", folder_cam(tmp_path, after="keep")))
    time.sleep(0.3)
    img = png_bytes(noise(8, 8, 0))
    for name in (".hidden.png", "a.tmp", "b.png.part", "c.png~", "notes.txt", "d.png.tmp"):
        (tmp_path / name).write_bytes(img)
    (tmp_path / "real.PNG").write_bytes(img)
    [cap] = c.take(1)
    assert Path(cap.origin).name == "real.PNG"
    c.nothing_more()


def test_folder_corrupt_files_give_error_captures(tmp_path, collect):
    c = collect(open_source("cam", folder_cam(tmp_path)))
    time.sleep(0.3)
    img = noise(60, 80, 0)
    (tmp_path / "garbage.png").write_bytes(b"not an image at all" * 10)
    png, jpg = png_bytes(img), cv2.imencode(".jpg", img)[1].tobytes()
    (tmp_path / "cut.png").write_bytes(png[: len(png) // 2])
    (tmp_path / "cut.jpg").write_bytes(jpg[: len(jpg) // 2])
    caps = {Path(cap.origin).name: cap for cap in c.take(3)}
    assert all(cap.image is None for cap in caps.values())
    assert caps["garbage.png"].error.startswith(f"cannot decode {tmp_path / 'garbage.png'}")
    assert caps["cut.png"].error.startswith("cannot decode")
    assert caps["cut.jpg"].error.endswith("truncated JPEG")
    # Never deleted unjudged: quarantined with a note of why.
    assert (tmp_path / "quarantine" / "garbage.png").exists()
    assert "ERROR: cannot decode" in (tmp_path / "quarantine" / "garbage.png.txt").read_text()
    assert not (tmp_path / "done").exists()


def test_folder_sku_pattern_gives_sku_and_part_or_an_error(tmp_path, collect):
    cfg = folder_cam(tmp_path, sku=None, recursive=True,
                     sku_pattern=r"^(?P<sku>[A-Za-z0-9]+)/.*_(?P<part>\d+)\.png$")
    c = collect(open_source("cam", cfg))
    time.sleep(0.3)
    (tmp_path / "gearA").mkdir()
    time.sleep(0.2)  # the new subfolder is watched
    (tmp_path / "gearA" / "shot_0042.png").write_bytes(png_bytes(noise(8, 8, 0)))
    [ok] = c.take(1)
    (tmp_path / "loose.png").write_bytes(png_bytes(noise(8, 8, 0)))
    [bad] = c.take(1)
    assert (ok.sku, ok.part_id, ok.error) == ("gearA", "0042", None)
    assert bad.image is None and "loose.png" in bad.error and "sku_pattern" in bad.error
    assert (tmp_path / "done" / "gearA" / "shot_0042.png").exists()
    assert (tmp_path / "quarantine" / "loose.png").exists()


def test_folder_moves_with_collision_safe_names_or_deletes(tmp_path, collect):
    moving, deleting = tmp_path / "m", tmp_path / "d"
    moving.mkdir()
    deleting.mkdir()
    m = collect(open_source("m", folder_cam(moving, after="move")))
    d = collect(open_source("d", folder_cam(deleting, after="delete")))
    time.sleep(0.3)
    for i in range(2):  # the same name twice: the second must not overwrite the first
        (moving / "x.png").write_bytes(png_bytes(noise(8, 8, i)))
        m.take(1)
    (deleting / "y.png").write_bytes(png_bytes(noise(8, 8, 0)))
    d.take(1)
    assert sorted(p.name for p in (moving / "done").iterdir()) == ["x-1.png", "x.png"]
    assert not (moving / "x.png").exists() and list(deleting.iterdir()) == []


def test_folder_sends_existing_files_and_rescans_what_a_full_queue_dropped(
        tmp_path, collect, monkeypatch):
    monkeypatch.setattr(folder_mod, "QUEUE_SIZE", 1)
    monkeypatch.setattr(folder_mod, "SETTLE_S", 0.0)
    (tmp_path / "old.png").write_bytes(png_bytes(noise(8, 8, 0)))
    # max_fps slows the consumer, so the one-slot queue overflows while files arrive.
    c = collect(open_source("cam", folder_cam(tmp_path, existing=True, max_fps=10)))
    [first] = c.take(1)
    assert Path(first.origin).name == "old.png"
    for i in range(6):
        (tmp_path / f"n{i}.png").write_bytes(png_bytes(noise(8, 8, i)))
    names = sorted(Path(cap.origin).name for cap in c.take(6))
    assert names == [f"n{i}.png" for i in range(6)]
    c.nothing_more()


def test_folder_takes_files_written_as_it_starts_soon_with_a_deadline_from_then(
        tmp_path, collect, monkeypatch):
    """A file written just before the watch began has no event and is too young for the
    start-up scan: the next scan comes after SETTLE_S, not RESCAN_S, and the frame's
    deadline counts from when the line first saw it (found by the fault suite: files
    written while a restarted line was starting timed out at the 10 s re-scan)."""
    monkeypatch.setattr(folder_mod, "SETTLE_S", 0.5)
    monkeypatch.setattr(folder_mod, "RESCAN_S", 60.0)
    (tmp_path / "young.png").write_bytes(png_bytes(noise(8, 8, 0)))
    t0 = time.time()
    c = collect(open_source("cam", folder_cam(tmp_path, existing=True)))
    [cap] = c.take(1, timeout=5.0)
    assert Path(cap.origin).name == "young.png" and cap.error is None
    assert cap.capture_ts <= t0 and cap.received_ts is not None and cap.received_ts >= t0
    c.nothing_more()


def test_folder_waits_for_a_missing_folder(tmp_path, collect):
    c = collect(open_source("cam", folder_cam(tmp_path / "later")))
    time.sleep(0.3)
    (tmp_path / "later").mkdir()
    time.sleep(0.5)  # reconnect backoff 0.1 s, then the watch starts
    (tmp_path / "later" / "a.png").write_bytes(png_bytes(noise(8, 8, 0)))
    assert c.take(1)[0].error is None


# --- opencv -----------------------------------------------------------------------------


def write_video(path: Path, n: int, size: tuple[int, int] = (64, 48)) -> None:
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, size)
    assert w.isOpened()
    for i in range(n):
        w.write(np.full((size[1], size[0], 3), 30 * i, np.uint8))
    w.release()


def opencv_cam(uri: str, **kw) -> OpenCVCamera:
    return OpenCVCamera(type="opencv", uri=uri, sku="widget", **kw)


def test_opencv_reads_every_frame_of_a_video_file_then_ends(tmp_path, collect):
    write_video(tmp_path / "v.avi", 6)
    c = collect(open_source("cam", opencv_cam(str(tmp_path / "v.avi"))))
    caps = c.take(6)
    assert c.ended()
    assert [cap.part_id for cap in caps] == ["1", "2", "3", "4", "5", "6"]
    assert all(cap.image.shape == (48, 64, 3) and cap.pixel_format == "bgr8" for cap in caps)
    assert [round(float(cap.image.mean()) / 30) for cap in caps] == [0, 1, 2, 3, 4, 5]
    assert not np.shares_memory(caps[0].image, caps[1].image)


def test_opencv_loop_restarts_a_video_file(tmp_path, collect):
    write_video(tmp_path / "v.avi", 3)
    c = collect(open_source("cam", opencv_cam(str(tmp_path / "v.avi"), loop=True)))
    caps = c.take(7)
    assert [round(float(cap.image.mean()) / 30) for cap in caps] == [0, 1, 2, 0, 1, 2, 0]


def test_opencv_reads_an_image_sequence(tmp_path, collect):
    for i in range(4):
        cv2.imwrite(str(tmp_path / f"img_{i:04d}.png"), np.full((20, 30), 50 * i, np.uint8))
    c = collect(open_source("cam", opencv_cam(str(tmp_path / "img_%04d.png"))))
    caps = c.take(4)
    assert c.ended()
    assert [int(cap.image[0, 0, 0]) for cap in caps] == [0, 50, 100, 150]
    assert caps[0].image.shape == (20, 30, 3) and caps[0].origin.endswith("img_%04d.png")


def test_opencv_missing_file_or_sku_is_a_source_error(tmp_path):
    with pytest.raises(SourceError, match="no video file"):
        open_source("cam", opencv_cam(str(tmp_path / "none.avi")))
    write_video(tmp_path / "v.avi", 1)
    cfg = OpenCVCamera(type="opencv", uri=str(tmp_path / "v.avi"), sku_pattern="(?P<sku>x)")
    with pytest.raises(SourceError, match="set sku"):
        open_source("cam", cfg)


# --- aravis (fake GigE Vision camera on 127.0.0.1) --------------------------------------


def aravis_cam(**kw) -> AravisCamera:
    return AravisCamera(type="aravis", device="127.0.0.1", sku="widget", reconnect_min_s=0.2,
                        reconnect_max_s=1.0, **kw)


@pytest.mark.parametrize(("genicam", "shape", "dtype", "wire"), [
    ("Mono8", (512, 512), np.uint8, "mono8"),
    ("Mono16", (512, 512), np.uint16, "mono16"),
    ("RGB8", (512, 512, 3), np.uint8, "rgb8"),
    ("BayerRG8", (512, 512, 3), np.uint8, "bgr8"),
])
def test_aravis_grabs_frames_by_address(fake_camera, collect, genicam, shape, dtype, wire):
    c = collect(open_source("cam", aravis_cam(pixel_format=genicam)))
    caps = c.take(3)
    for cap in caps:
        assert cap.error is None and cap.pixel_format == wire and cap.sku == "widget"
        assert cap.image.shape == shape and cap.image.dtype == dtype
        assert cap.image.flags.c_contiguous and cap.origin == "aravis:FAKE42"
    assert not np.shares_memory(caps[0].image, caps[1].image)
    assert len({cap.part_id for cap in caps}) == 3


def test_aravis_software_trigger_and_features(fake_camera, collect):
    cfg = aravis_cam(trigger="software", max_fps=20, features={"Width": 256, "Height": 128})
    caps = collect(open_source("cam", cfg)).take(3)
    assert all(cap.image.shape == (128, 256) for cap in caps)


def test_aravis_reconnects_when_the_camera_comes_back(fake_camera, collect):
    c = collect(open_source("cam", aravis_cam(pixel_format="Mono8")))
    c.take(2)
    with capture_logs() as logs:
        fake_camera.kill()
        time.sleep(0.5)
        while c.q.qsize():  # frames grabbed before the kill
            c.q.get()
        fake_camera.start()
        caps = c.take(3, timeout=30)
    assert all(cap.error is None and cap.image.shape == (512, 512) for cap in caps)
    assert any(e["event"] == "source lost, reconnecting" for e in logs)


def test_aravis_refused_setting_is_a_source_error(fake_camera, collect):
    c = collect(open_source("cam", aravis_cam(pixel_format="NoSuchFormat")))
    with pytest.raises(SourceError, match="cameras.cam: setting up the camera"):
        c.take(1)


def test_aravis_device_must_be_an_address():
    with pytest.raises(SourceError, match="IP address"):
        open_source("cam", aravis_cam().model_copy(update={"device": "Aravis-Fake-FAKE42"}))


# --- pylon (camera emulation) -----------------------------------------------------------


@pytest.fixture
def camemu(monkeypatch) -> None:
    # Read when pylon creates the emulation transport, which the source does on open.
    monkeypatch.setenv("PYLON_CAMEMU", "1")


def pylon_cam(**kw) -> PylonCamera:
    return PylonCamera(type="pylon", device_class="BaslerCamEmu", sku="widget",
                       reconnect_min_s=0.1, reconnect_max_s=0.2, **kw)


def test_pylon_emulator_grabs_frames(camemu, collect):
    caps = collect(open_source("cam", pylon_cam(pixel_format="Mono12", max_fps=50))).take(3)
    for cap in caps:
        assert cap.error is None and cap.pixel_format == "mono16" and cap.sku == "widget"
        assert cap.image.shape == (1040, 1024) and cap.image.dtype == np.uint16
        assert cap.origin == "pylon:0815-0000"
    assert caps[0].image.max() > 4095  # 12-bit scaled to the full 16-bit range


def test_pylon_emulator_replays_a_folder_on_software_trigger(camemu, tmp_path, collect):
    images = [noise(48, 64, i, channels=1) for i in range(3)]
    for i, img in enumerate(images):
        cv2.imwrite(str(tmp_path / f"img{i}.png"), img)
    cfg = pylon_cam(pixel_format="Mono8", trigger="software", features={
        "ImageFileMode": "On", "TestImageSelector": "Off", "ImageFilename": str(tmp_path)})
    caps = collect(open_source("cam", cfg)).take(4)
    for cap, img in zip(caps, [*images, images[0]], strict=True):
        assert np.array_equal(cap.image, img)


def test_pylon_missing_camera_is_retried_until_stopped(camemu, collect):
    with capture_logs() as logs:
        c = collect(open_source("cam", pylon_cam(serial="no-such-serial")))
        time.sleep(0.5)
        c.close()
    assert c.q.get_nowait() is None  # ended without frames or errors
    reasons = [e["reason"] for e in logs if e["event"] == "source lost, reconnecting"]
    assert len(reasons) >= 2 and "no-such-serial" in reasons[0]


def test_pylon_refused_setting_is_a_source_error(camemu, collect):
    c = collect(open_source("cam", pylon_cam(pixel_format="NoSuchFormat")))
    with pytest.raises(SourceError, match="PixelFormat"):
        c.take(1)
