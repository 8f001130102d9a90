"""The line configuration (`inspectd run -c /etc/inspectd/inspectd.yaml`), strict like all settings.

One document for every role and tool of a host: acquisition, worker and sink read their
sections, so do the audit commands (`sink.database`), the image store (`sink.images`) and
refit (`refit`); it lives in `core` so none of them imports another to read its settings.
Cameras are a discriminated union on `type`; every section forbids unknown keys, and
`inspectd validate-config` names the offending key. Endpoints default to ipc sockets under
`run_dir` (or loopback tcp); nothing binds a public interface unless configured to.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from inspectd.core.settings import InspectdSettings, Section
from inspectd.core.wire import ProtocolError, valid_name


def _name(v: str, what: str) -> str:
    try:
        return valid_name(v, what)
    except ProtocolError as e:
        raise ValueError(str(e)) from None


class CameraBase(Section):
    sku: str | None = Field(
        None, description="SKU of every frame from this camera (else taken from sku_pattern)"
    )
    sku_pattern: str | None = Field(
        None, description="regex with a named group `sku` (and optionally `part`) matched "
        "against the file's path relative to the folder (folder sources)"
    )
    deadline_ms: int = Field(2000, gt=0, description="verdict needed within this of capture")
    queue_bytes: int = Field(
        256 * 2**20, gt=0, description="pixels held for a worker, at most this many bytes; "
        "a frame waits there, earliest deadline first, until a worker is free. Full: a file "
        "source stops taking files, a live camera sheds the frame nearest its deadline"
    )
    max_pixels: int = Field(
        64_000_000, gt=0, description="a frame larger than this (width × height) is ERROR; "
        "files are checked before they are decoded"
    )
    endpoint: str | None = Field(
        None, description="frames endpoint this camera's acquire binds (default ipc in run_dir)"
    )
    max_fps: float | None = Field(None, gt=0, description="pace frames to at most this rate")
    reconnect_min_s: float = Field(0.5, gt=0, description="first reconnect backoff")
    reconnect_max_s: float = Field(30.0, gt=0, description="reconnect backoff cap")

    @field_validator("sku")
    @classmethod
    def _sku(cls, v: str | None) -> str | None:
        return None if v is None else _name(v, "sku")

    @field_validator("sku_pattern")
    @classmethod
    def _pattern(cls, v: str | None) -> str | None:
        if v is None:
            return v
        try:
            groups = re.compile(v).groupindex
        except re.error as e:
            raise ValueError(f"not a regular expression: {e}") from None
        if "sku" not in groups:
            raise ValueError("needs a named group (?P<sku>...)")
        return v


class FolderCamera(CameraBase):
    type: Literal["folder"]
    path: Path = Field(description="watched folder (inotify); complete files only")
    patterns: list[str] = Field(
        ["*.png", "*.jpg", "*.jpeg", "*.bmp", "*.tif", "*.tiff"], description="file globs"
    )
    recursive: bool = Field(False, description="watch subfolders too")
    after: Literal["move", "delete", "keep"] = Field(
        "move", description="what happens to a file once it has been sent"
    )
    done_dir: Path | None = Field(None, description="where `move` puts files (default path/done)")
    quarantine_dir: Path | None = Field(
        None, description="where files judged ERROR or TIMEOUT go, with a .txt of why; never "
        "deleted unjudged (default path/quarantine)"
    )
    existing: bool = Field(True, description="also send files already there at start")


class OpenCVCamera(CameraBase):
    type: Literal["opencv"]
    uri: str | int = Field(description="USB index, video file, RTSP URL or image sequence")
    loop: bool = Field(False, description="restart a video file at its end")
    width: int | None = Field(None, gt=0)
    height: int | None = Field(None, gt=0)


class AravisCamera(CameraBase):
    type: Literal["aravis"]
    device: str = Field(
        description="camera IP address (e.g. 127.0.0.1), opened directly: an id would need "
        "discovery, which broadcasts"
    )
    pixel_format: str | None = Field(None, description="GenICam PixelFormat, e.g. Mono8")
    exposure_us: float | None = Field(None, gt=0)
    trigger: Literal["free", "software", "hardware"] = Field(
        "free", description="hardware = first Line* trigger source (override in features)"
    )
    buffers: int = Field(8, ge=2, description="stream buffers")
    features: dict[str, str | int | float | bool] = Field(
        default_factory=dict, description="more GenICam features, set last: {Gain: 6}"
    )


class PylonCamera(CameraBase):
    type: Literal["pylon"]
    serial: str | None = Field(None, description="serial number; null = first device")
    device_class: str | None = Field(
        None, description="transport, e.g. BaslerCamEmu for emulation (limits enumeration)"
    )
    pixel_format: str | None = Field(None, description="GenICam PixelFormat, e.g. Mono8")
    exposure_us: float | None = Field(None, gt=0)
    trigger: Literal["free", "software", "hardware"] = Field(
        "free", description="hardware = Line1 (override TriggerSource in features)"
    )
    features: dict[str, str | int | float | bool] = Field(
        default_factory=dict, description="more GenICam features, set last: "
        "{Gain: 6} or, emulated, {ImageFileMode: 'On', ImageFilename: /dir}"
    )


Camera = Annotated[
    FolderCamera | OpenCVCamera | AravisCamera | PylonCamera, Field(discriminator="type")
]


class WorkerSettings(Section):
    count: int = Field(1, ge=1, description="worker processes on this host")
    max_batch: int = Field(8, ge=1, description="frames of one SKU scored together")
    max_wait_ms: float = Field(5.0, ge=0, description="wait this long to fill a batch")
    model_cache: int = Field(4, ge=1, description="SKU models kept loaded (LRU)")
    device: Literal["auto", "cpu", "cuda"] = Field("auto")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto = bf16 only where the artifact says accuracy holds"
    )
    threads: int | None = Field(
        None, ge=1, description="torch/OpenMP/faiss threads per worker (default: cores / count)"
    )
    attach_ok_every: int = Field(
        20, ge=0, description="send OK frames' pixels to the sink for refit, one in N on "
        "average, chosen at random (a fixed every-Nth would alias with periodic fixtures); "
        "0 = none"
    )

    @model_validator(mode="before")
    @classmethod
    def _replaced(cls, data: Any) -> Any:
        if isinstance(data, dict) and "queue" in data:
            raise ValueError("'queue' was replaced by cameras.<name>.queue_bytes: frames wait "
                             "for a worker by deadline, bounded in bytes, not by count")
        return data


class ImageSettings(Section):
    save_ng: bool = Field(True, description="write NG image, mask and overlay")
    save_error: bool = Field(True, description="write frames judged ERROR when pixels exist")
    ok_per_sku: int = Field(2000, ge=0, description="OK images kept per SKU (oldest dropped)")
    ng_retention_days: int | None = Field(
        90, ge=1, description="delete NG and ERROR images older than this; null = keep forever"
    )
    min_free_ok: float = Field(
        10.0, ge=0, lt=100, description="percent of the data filesystem's size that must stay "
        "free to write OK and unjudged samples; 0 = no limit"
    )
    min_free_images: float = Field(
        5.0, ge=0, lt=100, description="percent that must stay free to write NG and ERROR "
        "images; 0 = no limit (audit rows never stop)"
    )

    @model_validator(mode="after")
    def _free_order(self) -> ImageSettings:
        if self.min_free_images > self.min_free_ok:
            raise ValueError(f"min_free_images ({self.min_free_images}) must not exceed "
                             f"min_free_ok ({self.min_free_ok}): OK samples stop first")
        return self


class DatabaseSettings(Section):
    url: str | None = Field(None, description="SQLAlchemy URL; null = SQLite in data_dir")
    commit_rows: int = Field(200, ge=1, description="commit after this many rows")
    commit_interval_ms: float = Field(250, gt=0, description="… or after this long")
    retry_s: float = Field(2.0, gt=0, description="retry an unreachable database this often")
    max_spool_bytes: int = Field(
        2**30, ge=1, description="spool above this is an alarm (logged, metric); rows still "
        "spool while the disk has room"
    )
    max_memory_rows: int = Field(
        20_000, ge=1, description="rows kept in memory when neither the database nor the "
        "spool takes them; beyond, the oldest are lost (counted, logged)"
    )


class SinkSettings(Section):
    timeout_grace_ms: float = Field(
        250, ge=0, description="after a frame's deadline, wait this long before TIMEOUT"
    )
    max_pending: int = Field(100_000, ge=1, description="announced frames tracked at once")
    database: DatabaseSettings = DatabaseSettings()
    images: ImageSettings = ImageSettings()


class PlcTiming(Section):
    """What every PLC output shares: request timeout, the reject pulse, maximum age, heartbeat."""

    timeout_s: float = Field(1.0, gt=0, description="per request; a connect may take 3x")
    reject_pulse_ms: float = Field(100, gt=0, description="reject output on this long per reject")
    reject_gap_ms: float | None = Field(
        None, gt=0, description="reject output off at least this long between two pulses "
        "(null = reject_pulse_ms); pulses queue rather than merge"
    )
    max_age_ms: float | None = Field(
        1000, gt=0, description="an output not written this long after its verdict was decided "
        "is dropped and counted, never written late (null = no limit)"
    )
    heartbeat_s: float = Field(1.0, gt=0, description="heartbeat period, while the sink runs")

    @property
    def gap_ms(self) -> float:
        return self.reject_pulse_ms if self.reject_gap_ms is None else self.reject_gap_ms


# Keys of the Modbus output that one FC16 block per verdict replaced (README "PLC").
_MODBUS_REMOVED = {
    "verdict_register": "verdict_block (the verdict code is its third register)",
    "part_register": "verdict_block (the part id is its second register)",
}


class ModbusSettings(PlcTiming):
    host: str = Field("127.0.0.1")
    port: int = Field(502, gt=0, lt=65536)
    unit: int = Field(1, ge=0, le=247, description="Modbus unit (slave) id")
    verdict_block: int | None = Field(
        None, ge=0, description="first of 3 holding registers written in one FC16 per verdict: "
        "sequence (1..65535, wrapping, never 0), part id (low 16 bits, 0 = not numeric), "
        "verdict code (1 OK, 2 NG, 3 ERROR, 4 TIMEOUT)"
    )
    slots: int = Field(
        1, ge=1, description="blocks, one per part in flight: the block of a part starts at "
        "verdict_block + 3 * (part_id % slots)"
    )
    reject_coil: int | None = Field(
        None, ge=0, description="coil address pulsed on every reject (NG, ERROR, TIMEOUT)"
    )
    heartbeat_register: int | None = Field(
        None, ge=0, description="holding register incremented every heartbeat_s"
    )

    @model_validator(mode="before")
    @classmethod
    def _removed_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key, new in _MODBUS_REMOVED.items():
                if key in data:
                    raise ValueError(
                        f"{key} was removed: each verdict is one FC16 write of "
                        f"sequence, part id and verdict code at {new}")
        return data

    @model_validator(mode="after")
    def _block_fits(self) -> ModbusSettings:
        if self.verdict_block is not None and self.verdict_block + 3 * self.slots > 65536:
            raise ValueError("verdict_block + 3 * slots must stay within 65536 registers")
        return self

    @property
    def verdict_register(self) -> int | None:
        """Wire address of slot 0's verdict code (verdict_block + 2), None without a block.
        Read-only, for readers of the old key's attribute; the key itself is an error."""
        return None if self.verdict_block is None else self.verdict_block + 2


_NODE_ID = re.compile(r"^(ns=\d+;|nsu=[^;]+;)?[isgb]=.+$")


class OpcuaSettings(PlcTiming):
    endpoint: str = Field("opc.tcp://127.0.0.1:4840", description="the server's endpoint URL "
                          "(security policy None, anonymous)")
    sequence_node: str | None = Field(
        None, description="node id (e.g. 'ns=2;s=Line1.Sequence') written with the sequence "
        "(1..65535, wrapping, never 0), last of the three in one Write request per verdict"
    )
    part_node: str | None = Field(
        None, description="node id written with the part id (low 16 bits, 0 = not numeric)"
    )
    verdict_node: str | None = Field(
        None, description="node id written with the verdict code (1 OK, 2 NG, 3 ERROR, 4 TIMEOUT)"
    )
    reject_node: str | None = Field(
        None, description="Boolean node id pulsed true on every reject (NG, ERROR, TIMEOUT)"
    )
    heartbeat_node: str | None = Field(
        None, description="integer node id incremented every heartbeat_s"
    )

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, v: str) -> str:
        if not v.startswith("opc.tcp://"):
            raise ValueError("expected opc.tcp://host:port[/path]")
        return v

    @field_validator("sequence_node", "part_node", "verdict_node", "reject_node",
                     "heartbeat_node")
    @classmethod
    def _node_id(cls, v: str | None) -> str | None:
        if v is not None and not _NODE_ID.match(v):
            raise ValueError(f"not an OPC UA node id: {v!r} (e.g. 'ns=2;s=Line1.Verdict', "
                             "'ns=2;i=1001')")
        return v

    @model_validator(mode="after")
    def _triple(self) -> OpcuaSettings:
        triple = (self.sequence_node, self.part_node, self.verdict_node)
        if any(n is not None for n in triple) and any(n is None for n in triple):
            raise ValueError("set sequence_node, part_node and verdict_node together")
        return self


class PlcSettings(Section):
    type: Literal["none", "modbus", "opcua"] = Field(
        "none", description="reject output: none, modbus (Modbus TCP) or opcua (OPC UA client)"
    )
    modbus: ModbusSettings = ModbusSettings()
    opcua: OpcuaSettings = OpcuaSettings()


class MqttSettings(Section):
    enabled: bool = Field(False)
    host: str = Field("127.0.0.1")
    port: int = Field(1883, gt=0, lt=65536)
    topic_prefix: str = Field("inspectd", description="topic = prefix/<line>/<sku>/<VERDICT>")
    qos: int = Field(1, ge=0, le=2)
    ng_only: bool = Field(False, description="publish rejects only")


class EventSettings(Section):
    endpoint: str | None = Field(
        None, description="ZeroMQ PUB endpoint the sink binds (default ipc in run_dir)"
    )
    mqtt: MqttSettings = MqttSettings()


class MetricsSettings(Section):
    enabled: bool = Field(True, description="Prometheus endpoint on the sink's host")
    host: str = Field("127.0.0.1")
    port: int = Field(9708, ge=0, lt=65536, description="0 = any free port")


class SecuritySettings(Section):
    keys_dir: Path | None = Field(
        None, description="the line's CURVE key pair (inspectd keys generate), the same on "
        "every host of the line; used on every tcp endpoint, required beyond loopback "
        "(default data_dir/keys)"
    )


class SupervisorSettings(Section):
    restart_limit: int = Field(5, ge=0, description="restarts of one child per window")
    restart_window_s: float = Field(60.0, gt=0)
    drain_s: float = Field(5.0, ge=0, description="on SIGTERM, wait this long for verdicts")
    heartbeat_timeout_s: float = Field(10.0, gt=0, description="a child silent this long is hung")


class RefitSettings(Section):
    """`inspectd refit` and `inspectd models drift`: training pool, gates, resources."""

    min_images: int = Field(30, ge=4, description="fewer OK frames in the pool is an error")
    max_images: int | None = Field(
        1000, ge=4, description="newest OK frames used at most (null = all kept)"
    )
    near_threshold: float = Field(
        0.9, gt=0.0, le=1.0, description="fit only on OK frames that scored below this × "
        "threshold (one above may be an unnoticed defect); the gate frames are drawn from "
        "every OK frame kept"
    )
    holdout: float = Field(
        0.2, gt=0.0, lt=0.9, description="share of every kept OK frame held out for the gates "
        "(never fitted)"
    )
    min_holdout: int = Field(10, ge=1, description="at least this many held-out frames")
    max_false_reject: float = Field(
        0.01, ge=0.0, le=1.0, description="gate: the candidate's false-reject rate on the "
        "held-out OK frames must not be significantly above this (binomial test at 5 %)"
    )
    max_shift: float = Field(
        0.2, ge=0.0, description="gate: candidate's held-out p95 score/threshold may exceed the "
        "current version's by at most this"
    )
    model: Path | None = Field(
        None, description="model settings YAML for a SKU without a current version "
        "(else the current version's own settings are reused); null = defaults"
    )
    threads: int | None = Field(
        None, ge=1, description="torch/OpenMP/faiss threads of a refit; null = every core "
        "under refit.idle (it only takes what the line leaves), else 1"
    )
    nice: int = Field(10, ge=0, le=19, description="a refit lowers its CPU priority by this")
    idle: bool = Field(
        True, description="run a refit under SCHED_IDLE (Linux): only on CPU time the line "
        "leaves over, so it never delays a frame; a line kept saturated stalls the refit"
    )
    drift_ks: float = Field(
        0.3, gt=0.0, le=1.0, description="drift: KS statistic of recent vs calibration scores "
        "past which (scores moved up, p < 0.01) a refit is recommended"
    )
    drift_min_frames: int = Field(30, ge=1, description="fewer recent frames: no drift verdict")


class LineSettings(InspectdSettings):
    """One host's part of a line: cameras, worker, sink and their outputs."""

    line: str = Field("line1", description="line name, recorded in every audit row")
    data_dir: Path = Field(
        Path(os.environ.get("STATE_DIRECTORY", "~/.local/state/inspectd")),
        description="models/, images/, spool/, the SQLite audit log",
    )
    run_dir: Path | None = Field(
        None, description="ipc sockets (default $RUNTIME_DIRECTORY or data_dir/run)"
    )
    sink_endpoint: str | None = Field(
        None, description="the sink's PULL endpoint (announcements and verdicts)"
    )
    log_level: str = Field("info")
    cameras: dict[str, Camera] = Field(default_factory=dict)
    worker: WorkerSettings = WorkerSettings()
    sink: SinkSettings = SinkSettings()
    plc: PlcSettings = PlcSettings()
    events: EventSettings = EventSettings()
    metrics: MetricsSettings = MetricsSettings()
    supervisor: SupervisorSettings = SupervisorSettings()
    security: SecuritySettings = SecuritySettings()
    refit: RefitSettings = RefitSettings()

    @field_validator("cameras")
    @classmethod
    def _camera_names(cls, v: dict[str, Any]) -> dict[str, Any]:
        for name in v:
            _name(name, "camera name")
        return v

    @field_validator("line")
    @classmethod
    def _line(cls, v: str) -> str:
        return _name(v, "line name")

    @model_validator(mode="after")
    def _paths(self) -> LineSettings:
        self.data_dir = self.data_dir.expanduser()
        if self.run_dir is None:
            rt = os.environ.get("RUNTIME_DIRECTORY")
            self.run_dir = Path(rt) if rt else self.data_dir / "run"
        for name, cam in self.cameras.items():
            if cam.sku is None and cam.sku_pattern is None:
                raise ValueError(f"cameras.{name}: set sku or sku_pattern")
        return self

    # Resolved endpoints and paths, one place for every role.
    def frames_endpoint(self, camera: str) -> str:
        return self.cameras[camera].endpoint or f"ipc://{self.run_dir}/frames-{camera}.sock"

    def sink_address(self) -> str:
        return self.sink_endpoint or f"ipc://{self.run_dir}/sink.sock"

    def events_address(self) -> str:
        return self.events.endpoint or f"ipc://{self.run_dir}/events.sock"

    def database_url(self) -> str:
        return self.sink.database.url or f"sqlite:///{self.data_dir / 'audit.db'}"

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    @property
    def images_dir(self) -> Path:
        return self.data_dir / "images"

    @property
    def spool_dir(self) -> Path:
        return self.data_dir / "spool"

    @property
    def journal_dir(self) -> Path:
        return self.data_dir / "journal"

    @property
    def keys_dir(self) -> Path:
        return (self.security.keys_dir or self.data_dir / "keys").expanduser()
