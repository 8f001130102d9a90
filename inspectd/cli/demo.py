"""`inspectd demo`: a whole line on the embedded defaults, on this machine, in a few minutes.

Synthetic products (two SKUs), a PatchCore model fitted per SKU and published into the line's
model registry, `inspectd run` with a watched-folder camera, every test image dropped into
the folder as a camera PC would, then the audit summary and where the NG images went.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from rich.table import Table

from inspectd.cli.common import err, fmt, out
from inspectd.core.errors import InspectdError

SKUS = ("texture", "object")


def _notify_socket(path: Path) -> socket.socket:
    path.unlink(missing_ok=True)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(path))
    s.settimeout(0.5)
    return s


def _wait_ready(sock: socket.socket, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    """The demo is the daemon's service manager: it waits for READY=1 like systemd does."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise InspectdError(f"the line exited with code {proc.returncode}; see {log}")
        try:
            if b"READY=1" in sock.recv(4096):
                return
        except TimeoutError:
            pass
    raise InspectdError(f"the line did not report READY within {timeout:.0f} s; see {log}")


def _count(url: str) -> int:
    import sqlalchemy as sa

    eng = sa.create_engine(url)
    try:
        with eng.connect() as c:
            return int(c.execute(sa.text("SELECT COUNT(*) FROM verdicts")).scalar_one())
    except sa.exc.OperationalError:
        return 0
    finally:
        eng.dispose()


def run_demo(work: Path, n_train: int, echo: Any) -> dict[str, Any]:
    import sqlalchemy as sa

    from inspectd.lifecycle.registry import publish
    from inspectd.models import fit
    from inspectd.models.datasets.synthetic import generate
    from inspectd.models.evaluate import evaluate
    from inspectd.models.settings import ModelSettings

    work = work.resolve()
    data, line = work / "data", work / "line"
    shutil.rmtree(line, ignore_errors=True)
    echo(f"synthetic products {', '.join(SKUS)} → {data}")
    generate(data, SKUS, n_train=n_train, n_test_good=12, n_test_defect=18, size=256)
    metrics = {}
    for sku in SKUS:
        echo(f"fitting PatchCore for SKU {sku} on {n_train} OK images …")
        det = fit(data / sku / "train" / "good", ModelSettings(kind="patchcore"))
        metrics[sku] = evaluate(det, data, sku)
        staging = work / "artifacts" / sku
        shutil.rmtree(staging, ignore_errors=True)
        det.save(staging)
        publish(staging, line / "models", sku, "v1")

    inbox = line / "inbox"
    inbox.mkdir(parents=True, exist_ok=True)
    run_dir = Path(os.environ.get("XDG_RUNTIME_DIR", "/tmp")) / f"inspectd-demo-{os.getpid()}"
    config = {
        "line": "demo", "data_dir": str(line), "run_dir": str(run_dir), "log_level": "info",
        "cameras": {"cam1": {"type": "folder", "path": str(inbox), "after": "delete",
                             "deadline_ms": 5000,
                             "sku_pattern": r"(?P<sku>[a-z]+)_(?P<part>\d+)\.png"}},
        "metrics": {"port": 0},
    }
    cfg = line / "inspectd.yaml"
    cfg.write_text(yaml.safe_dump(config, sort_keys=False))
    log = line / "daemon.log"
    notify = _notify_socket(line / "notify.sock")
    echo(f"starting the line: inspectd run -c {cfg}  (log: {log})")
    with log.open("w") as logf:
        proc = subprocess.Popen([sys.executable, "-m", "inspectd", "run", "-c", str(cfg)],
                                stdout=logf, stderr=subprocess.STDOUT,
                                env={**os.environ, "NOTIFY_SOCKET": str(line / "notify.sock")})
        try:
            _wait_ready(notify, proc, log, 300)
            frames = []
            for sku in SKUS:
                frames += sorted((data / sku / "test").glob("*/*.png"))
            echo(f"line ready; the camera PC drops {len(frames)} frames into {inbox}")
            truth = {}
            for i, src in enumerate(frames):
                sku = src.parents[2].name
                name = f"{sku}_{i:05d}.png"
                tmp = inbox / f".{name}.part"
                shutil.copyfile(src, tmp)
                os.replace(tmp, inbox / name)
                truth[f"{i:05d}"] = src.parent.name != "good"
                time.sleep(0.02)
            url = f"sqlite:///{line / 'audit.db'}"
            end = time.monotonic() + 300
            while _count(url) < len(frames) and time.monotonic() < end:
                time.sleep(0.2)
        finally:
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(120)
            notify.close()
    if code != 0:
        raise InspectdError(f"the line exited with code {code}; see {log}")
    summary: dict[str, dict[str, int]] = {}
    ng_images = []
    eng = sa.create_engine(url)
    try:
        with eng.connect() as c:
            rows = c.execute(sa.text(
                "SELECT sku, part_id, verdict, image_path FROM verdicts ORDER BY capture_time"))
            for sku, part, verdict, image in rows:
                s = summary.setdefault(sku, dict.fromkeys(
                    ("frames", "OK", "NG", "ERROR", "TIMEOUT", "defects", "defect_rejected",
                     "good", "good_passed"), 0))
                s["frames"] += 1
                s[verdict] += 1
                if truth.get(part):
                    s["defects"] += 1
                    s["defect_rejected"] += verdict != "OK"
                else:
                    s["good"] += 1
                    s["good_passed"] += verdict == "OK"
                if verdict == "NG" and image:
                    ng_images.append(image)
    finally:
        eng.dispose()
    return {"metrics": metrics, "url": url, "config": cfg, "line": line, "summary": summary,
            "ng_images": ng_images}


def demo(
    workdir: Annotated[Path, typer.Option(help="data, models and the line's state go here")] = Path(
        "outputs/demo"),
    n_train: Annotated[int, typer.Option(help="OK images per SKU to fit on")] = 60,
) -> None:
    """A demo line on the embedded defaults: synthetic SKUs, fitted models, `inspectd run`
    with a watched-folder camera, every test frame judged, then the audit summary."""
    from inspectd.models.evaluate import KEYS

    r = run_demo(workdir, n_train, lambda msg: err.print(msg, highlight=False))
    table = Table("SKU", *KEYS, title="offline evaluation of the fitted models")
    for sku, m in r["metrics"].items():
        table.add_row(sku, *(fmt(m[k]) for k in KEYS))
    out.print(table)
    table = Table("SKU", "frames", "OK", "NG", "ERROR", "TIMEOUT", "defects rejected",
                  "good passed", title=f"the line's audit log ({r['url']})")
    for sku, c in r["summary"].items():
        table.add_row(sku, str(c["frames"]), *(str(c[v]) for v in ("OK", "NG", "ERROR", "TIMEOUT")),
                      f"{c['defect_rejected']}/{c['defects']}", f"{c['good_passed']}/{c['good']}")
    out.print(table)
    out.print(f"NG images, masks and overlays: {r['line'] / 'images' / 'ng'}")
    for path in r["ng_images"][:5]:
        out.print(f"  {path}")
    out.print(f"the line's config: {r['config']}; audit: inspectd audit stats -c {r['config']}")


def register(app: typer.Typer) -> None:
    app.command()(demo)
