"""Coreset sampler benchmark: approximate vs exact greedy k-center on synthetic clustered data.

    python benchmarks/bench_coreset.py [--n 200000] [--dim 384] [--k 2000] [--json OUT]

The data are `--dim`-dimensional (default 384, like PatchCore patch features) Gaussian clusters
of very different sizes on low-rank subspaces, plus 1% outliers. Samplers get these original
features, so their timings include the random projection to `--proj-dim` (128) dims; covering
radii are measured in that projected space (the one both samplers select in).

Reported per sampler, all in this one process:
  * selections/s end to end (k / wall time of `run`, projection and partitioning included) and
    in the selection loop alone (from the progress callback's timestamps);
  * covering radius (max distance of any row to its nearest selected row) and mean distance;
  * peak RSS (getrusage) after each step. The approximate sampler runs first, right after the
    data are made, so its increment over the baseline is its own working memory.
Exact greedy runs the full k only if a probe of `--exact-steps` selections predicts it takes
under `--exact-budget` seconds; otherwise its rate is extrapolated from the probe and its
radius is not measured (marked as such).
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from inspectd.models.patchcore.coreset import (  # noqa: E402
    ApproximateGreedyCoreset,
    ExactGreedyCoreset,
    RandomSampler,
    project_features,
)


def clustered(n: int, dim: int, clusters: int = 40, seed: int = 0) -> torch.Tensor:
    g = np.random.default_rng(seed)
    x = np.empty((n, dim), np.float32)
    rows = g.permutation(n)
    n_out = n // 100
    sizes = np.maximum((g.dirichlet(np.full(clusters, 0.7)) * (n - n_out)).astype(int), 3)
    sizes[-1] += n - n_out - sizes.sum()  # fill exactly n - n_out rows
    start = 0
    for size in sizes:
        rank = int(g.integers(4, 32))
        basis = g.normal(0, g.uniform(0.2, 1.5) / math.sqrt(rank), (rank, dim)).astype(np.float32)
        centre = g.normal(0, 3.0, dim).astype(np.float32)
        part = g.standard_normal((size, rank), np.float32) @ basis + centre
        part += 0.05 * g.standard_normal((size, dim), np.float32)
        x[rows[start : start + size]] = part
        start += size
    src = rows[g.integers(0, start, n_out)]  # outliers: scattered around random inliers
    x[rows[start:]] = x[src] + 1.5 * g.standard_normal((n_out, dim), np.float32)
    return torch.from_numpy(x)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def nearest_distances(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Distance from every row to its nearest selected row (chunked, bounded memory)."""
    c = x[idx]
    csq = (c * c).sum(1)
    step = max(1, 2**24 // len(c))
    out = []
    for a in range(0, len(x), step):
        r = x[a : a + step]
        near = torch.addmm(csq, r, c.T, alpha=-2).argmin(1)
        out.append((r - c[near]).pow_(2).sum(1).sqrt_())
    return torch.cat(out)


def timed(sampler, x: torch.Tensor) -> dict:
    marks: list[tuple[float, int]] = []
    t0 = time.perf_counter()
    idx = sampler.run(x, progress=lambda done, total: marks.append((time.perf_counter(), done)))
    wall = time.perf_counter() - t0
    (t1, d1), (t2, d2) = marks[0], marks[-1]
    loop = (d2 - d1) / (t2 - t1) if t2 > t1 else float("nan")
    return {
        "idx": idx,
        "k": len(idx),
        "seconds": wall,
        "sel_per_s": len(idx) / wall,
        "loop_sel_per_s": loop,
        "peak_rss_mib": peak_rss_mib(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=384, help="original feature dim")
    ap.add_argument("--proj-dim", type=int, default=128)
    ap.add_argument("--k", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--chunk-size", type=int, default=4096)
    ap.add_argument("--neighbour-cells", type=int, default=2)
    ap.add_argument("--exact-steps", type=int, default=300, help="exact greedy probe length")
    ap.add_argument("--exact-budget", type=float, default=120.0, help="s; else extrapolate")
    ap.add_argument("--no-exact", action="store_true", help="only the approximate sampler")
    ap.add_argument("--json", type=Path, help="write the results here")
    a = ap.parse_args()

    t = time.perf_counter()
    x = clustered(a.n, a.dim, seed=a.seed)
    res: dict = {
        "n": a.n,
        "dim": a.dim,
        "proj_dim": a.proj_dim,
        "k": a.k,
        "threads": torch.get_num_threads(),
        "data_seconds": time.perf_counter() - t,
        "baseline_peak_rss_mib": peak_rss_mib(),
        "data_mib": x.nbytes / 2**20,
    }
    common = {"ratio": 1.0, "proj_dim": a.proj_dim, "seed": a.seed, "max_size": a.k}
    # Warm-up on a slice (MKL/OpenMP start-up, first large allocations) so neither pays it.
    ApproximateGreedyCoreset(0.02, a.proj_dim, chunk_size=2048).run(x[:20_000])
    ExactGreedyCoreset(0.02, a.proj_dim).run(x[:20_000])
    approx = timed(
        ApproximateGreedyCoreset(
            **common, chunk_size=a.chunk_size, neighbour_cells=a.neighbour_cells
        ),
        x,
    )
    runs = {"approx": approx}
    if not a.no_exact:
        probe = timed(ExactGreedyCoreset(**{**common, "max_size": min(a.k, a.exact_steps)}), x)
        if a.k / probe["loop_sel_per_s"] <= a.exact_budget:
            runs["exact"] = timed(ExactGreedyCoreset(**common), x)
        else:
            runs["exact"] = {**probe, "idx": None, "extrapolated_from_steps": probe["k"]}
    runs["random"] = {"idx": RandomSampler(1.0, seed=a.seed, max_size=a.k).run(x)}
    proj = project_features(x, a.proj_dim, a.seed)
    for r in runs.values():
        if r.get("idx") is not None:
            d = nearest_distances(proj, r["idx"])
            r.update(radius=float(d.max()), mean_distance=float(d.mean()))
        r.pop("idx")
    res.update(runs)
    if "exact" in runs:
        e = runs["exact"]
        # End to end for a full exact run; loop rate (extrapolated to k) when only probed.
        e_rate = e["sel_per_s"] if "extrapolated_from_steps" not in e else e["loop_sel_per_s"]
        res["speedup"] = approx["sel_per_s"] / e_rate
        if "radius" in e:
            res["radius_ratio_approx_over_exact"] = approx["radius"] / e["radius"]
            res["mean_ratio_approx_over_exact"] = approx["mean_distance"] / e["mean_distance"]
    res["final_peak_rss_mib"] = peak_rss_mib()

    print(
        f"N={a.n} dim={a.dim}->{a.proj_dim} k={a.k} threads={res['threads']} data "
        f"{res['data_mib']:.0f} MiB, peak RSS after data {res['baseline_peak_rss_mib']:.0f} MiB"
    )
    cols = ["sel_per_s", "loop_sel_per_s", "seconds", "radius", "mean_distance", "peak_rss_mib"]
    print(f"{'sampler':8}" + "".join(f"{c:>16}" for c in cols))
    for name, r in runs.items():
        steps = r.get("extrapolated_from_steps")
        note = f"  (probe of {steps} steps; full k not run)" if steps else ""
        print(f"{name:8}" + "".join(f"{r.get(c, math.nan):16.3f}" for c in cols) + note)
    print(
        f"approx speed-up over exact: {res.get('speedup', math.nan):.1f}x; radius approx/exact: "
        f"{res.get('radius_ratio_approx_over_exact', math.nan):.3f}; mean distance approx/exact: "
        f"{res.get('mean_ratio_approx_over_exact', math.nan):.3f}"
    )
    if a.json:
        a.json.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
