"""The sink's Prometheus endpoint, scraped over HTTP on 127.0.0.1."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from inspectd.core.wire import Verdict
from inspectd.daemon.metrics import Metrics, MetricsError


@pytest.fixture
def served() -> Iterator[tuple[Metrics, int]]:
    m = Metrics()
    server, port = m.serve("127.0.0.1", 0)
    yield m, port
    server.shutdown()
    server.server_close()


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as rsp:
        text = rsp.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_verdicts_move_counters_and_stage_histograms(served):
    m, port = served
    before = _scrape(port)
    assert ("inspectd_late_verdicts_total", ()) in before
    timings = {"queue": 2.0, "decode": 1.0, "infer": 30.0, "total": 35.0}
    m.observe_verdict(Verdict("f1", "OK", camera="cam1", sku="A", timings_ms=timings), 0.05)
    m.observe_verdict(Verdict("f2", "NG", camera="cam1", sku="A", timings_ms=timings), 0.04)
    m.observe_verdict(Verdict("f3", "TIMEOUT", camera="cam2", sku="B"), 2.5)
    m.dropped("malformed message")
    m.late()
    m.set_pending(7)

    s = _scrape(port)
    assert s[("inspectd_frames_total", (("camera", "cam1"), ("sku", "A")))] == 2
    assert s[("inspectd_verdicts_total", (("sku", "A"), ("verdict", "NG")))] == 1
    assert s[("inspectd_verdicts_total", (("sku", "B"), ("verdict", "TIMEOUT")))] == 1
    assert s[("inspectd_dropped_total", (("reason", "malformed message"),))] == 1
    assert s[("inspectd_late_verdicts_total", ())] == 1
    assert s[("inspectd_pending_frames", ())] == 7
    assert s[("inspectd_stage_seconds_count", (("stage", "infer"),))] == 2
    assert s[("inspectd_stage_seconds_sum", (("stage", "infer"),))] == pytest.approx(0.06)
    e2e = (("le", "0.05"), ("stage", "capture_to_output"))
    assert s[("inspectd_stage_seconds_bucket", e2e)] == 2  # the TIMEOUT is in a later bucket
    assert s[("inspectd_stage_seconds_count", (("stage", "capture_to_output"),))] == 3


def test_health_gauges_and_model_info_follow_the_latest_state(served):
    m, port = served
    m.set_db_up(True)
    m.set_plc_up(False)
    m.set_spool_rows(12)
    m.set_worker_queue("0", 3)
    m.set_model("A", "v1")
    m.set_model("A", "v2")
    s = _scrape(port)
    assert s[("inspectd_db_up", ())] == 1
    assert s[("inspectd_plc_up", ())] == 0
    assert s[("inspectd_audit_spool_rows", ())] == 12
    assert s[("inspectd_worker_queue_depth", (("worker", "0"),))] == 3
    assert s[("inspectd_model_info", (("sku", "A"), ("version", "v2")))] == 1
    assert ("inspectd_model_info", (("sku", "A"), ("version", "v1"))) not in s


def test_two_metrics_objects_do_not_share_series():
    a, b = Metrics(), Metrics()
    a.dropped("overload")
    assert b.registry.get_sample_value("inspectd_dropped_total", {"reason": "overload"}) is None


def test_port_in_use_is_a_metrics_error(served):
    _, port = served
    with pytest.raises(MetricsError, match=f"127.0.0.1:{port}"):
        Metrics().serve("127.0.0.1", port)


def test_disk_spool_and_lost_rows_are_exported(served):
    m, port = served
    m.set_spool_bytes(4096, over_limit=True)
    m.set_disk(1, 123456)
    m.set_audit_memory(7, lost_total=3)
    m.set_audit_memory(2, lost_total=5)  # a running total: only the new ones count
    m.dropped("image skipped: disk low (ok)", 4)
    s = _scrape(port)
    assert s[("inspectd_audit_spool_bytes", ())] == 4096
    assert s[("inspectd_audit_spool_over_limit", ())] == 1
    assert s[("inspectd_disk_guard_level", ())] == 1
    assert s[("inspectd_disk_free_bytes", ())] == 123456
    assert s[("inspectd_audit_memory_rows", ())] == 2
    assert s[("inspectd_dropped_total", (("reason", "audit row lost"),))] == 5
    assert s[("inspectd_dropped_total", (("reason", "image skipped: disk low (ok)"),))] == 4
