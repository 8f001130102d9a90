"""Prometheus metrics of the sink: what the line judged, what it dropped, and how fast.

A dedicated registry (not prometheus_client's global one) keeps several sinks in one test
process apart and leaves out the default process collectors' name clashes.
"""

from __future__ import annotations

from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from inspectd.core.errors import InspectdError
from inspectd.core.wire import Verdict

# 1 ms … 5 s: queueing and inference are milliseconds, a TIMEOUT is seconds.
STAGE_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
STAGES = ("queue", "decode", "infer", "total")  # keys of Verdict.timings_ms
AUDIT_ROW_LOST = "audit row lost"  # no database, no spool, past max_memory_rows


class MetricsError(InspectdError):
    """The metrics endpoint could not start."""


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.frames = Counter("inspectd_frames", "Frames judged", ["sku", "camera"], registry=r)
        self.verdicts = Counter("inspectd_verdicts", "Verdicts audited", ["sku", "verdict"],
                                registry=r)
        self.drops = Counter("inspectd_dropped", "Messages or outputs dropped", ["reason"],
                             registry=r)
        self.late_verdicts = Counter("inspectd_late_verdicts",
                                     "Verdicts ignored: the frame was already judged", registry=r)
        self.stage = Histogram("inspectd_stage_seconds", "Time spent per stage", ["stage"],
                               buckets=STAGE_BUCKETS, registry=r)
        self.pending = Gauge("inspectd_pending_frames", "Announced frames awaiting a verdict",
                             registry=r)
        self.spool_rows = Gauge("inspectd_audit_spool_rows",
                                "Audit rows spooled while the database is unreachable", registry=r)
        self.spool_bytes = Gauge("inspectd_audit_spool_bytes", "Bytes of the audit spool on disk",
                                 registry=r)
        self.spool_over = Gauge("inspectd_audit_spool_over_limit",
                                "1 while the audit spool is above sink.database.max_spool_bytes",
                                registry=r)
        self.memory_rows = Gauge("inspectd_audit_memory_rows",
                                 "Audit rows in the writer's memory: not committed, not spooled "
                                 "(bounded by sink.database.max_memory_rows)", registry=r)
        self.disk_free = Gauge("inspectd_disk_free_bytes",
                               "Free bytes on the filesystem of data_dir/images", registry=r)
        self.disk_level = Gauge("inspectd_disk_guard_level",
                                "0 every image written, 1 OK/unjudged samples stopped "
                                "(sink.images.min_free_ok), 2 NG/ERROR images stopped too "
                                "(min_free_images)", registry=r)
        self._rows_lost = 0
        self.db_up = Gauge("inspectd_db_up", "1 while the audit database takes writes",
                           registry=r)
        self.plc_up = Gauge("inspectd_plc_up", "1 while the PLC output is healthy", registry=r)
        self.model_info = Gauge("inspectd_model_info", "Model version in use per SKU (value 1)",
                                ["sku", "version"], registry=r)
        self.worker_queue = Gauge("inspectd_worker_queue_depth", "Frames queued in a worker",
                                  ["worker"], registry=r)
        self.held = Gauge("inspectd_held_frames", "Frames held at a camera's acquisition, "
                          "waiting for a worker", ["camera"], registry=r)
        self._models: dict[str, str] = {}

    def observe_verdict(self, v: Verdict, capture_to_output_s: float | None) -> None:
        self.frames.labels(v.sku, v.camera).inc()
        self.verdicts.labels(v.sku, v.verdict).inc()
        for stage in STAGES:
            ms = v.timings_ms.get(stage)
            if ms is not None:
                self.stage.labels(stage).observe(ms / 1000)
        if capture_to_output_s is not None and capture_to_output_s >= 0:
            self.stage.labels("capture_to_output").observe(capture_to_output_s)

    def dropped(self, reason: str, n: int = 1) -> None:
        self.drops.labels(reason).inc(n)

    def late(self) -> None:
        self.late_verdicts.inc()

    def set_pending(self, n: int) -> None:
        self.pending.set(n)

    def set_spool_rows(self, n: int) -> None:
        self.spool_rows.set(n)

    def set_spool_bytes(self, n: int, over_limit: bool) -> None:
        self.spool_bytes.set(n)
        self.spool_over.set(int(over_limit))

    def set_audit_memory(self, rows: int, lost_total: int) -> None:
        """Rows held in memory, and the audit log's running count of rows lost (the part not
        yet counted goes to `inspectd_dropped_total{reason="audit row lost"}`)."""
        self.memory_rows.set(rows)
        if lost_total > self._rows_lost:
            self.dropped(AUDIT_ROW_LOST, lost_total - self._rows_lost)
            self._rows_lost = lost_total

    def set_disk(self, level: int, free_bytes: int) -> None:
        self.disk_free.set(free_bytes)
        self.disk_level.set(level)

    def set_db_up(self, up: bool) -> None:
        self.db_up.set(int(up))

    def set_plc_up(self, up: bool) -> None:
        self.plc_up.set(int(up))

    def set_model(self, sku: str, version: str) -> None:
        """The SKU's model in use; a new version replaces the old series."""
        old = self._models.get(sku)
        if old == version:
            return
        if old is not None:
            self.model_info.remove(sku, old)
        self._models[sku] = version
        self.model_info.labels(sku, version).set(1)

    def set_worker_queue(self, worker: str, depth: int) -> None:
        self.worker_queue.labels(worker).set(depth)

    def set_held(self, camera: str, frames: int) -> None:
        self.held.labels(camera).set(frames)

    def serve(self, host: str = "127.0.0.1", port: int = 0) -> tuple[WSGIServer, int]:
        """Serve /metrics in a daemon thread; port 0 picks a free one (returned)."""
        try:
            server, _ = start_http_server(port, host, self.registry)
        except OSError as e:
            raise MetricsError(f"metrics endpoint {host}:{port}: cannot bind ({e})") from None
        return server, server.server_port
