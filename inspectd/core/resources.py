"""CPU budgets of a process: thread counts and scheduling priority.

Roles and tools on one host share its cores, and oversubscribed OpenMP runs several times
slower, so a process sets its thread counts before torch is imported (OpenMP reads its
environment once). Torch and faiss are imported inside the functions that need them.
"""

from __future__ import annotations

import os
from typing import Any

THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def host_cores() -> int:
    return len(os.sched_getaffinity(0))


def set_threads(n: int) -> None:
    """Must run before torch is imported in this process (OpenMP reads the environment once).

    OpenMP threads also wait passively (they sleep, not spin, between parallel regions)
    unless the environment says otherwise: roles share the host's cores, and a spinning
    worker takes CPU the sink and acquisition need. Alone it scores as fast (BENCHMARKS.md)."""
    for var in THREAD_VARS:
        os.environ[var] = str(n)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import cv2

    cv2.setNumThreads(n)


def torch_threads(n: int) -> None:
    import faiss
    import torch

    torch.set_num_threads(n)
    faiss.omp_set_num_threads(n)


def limit_resources(threads: int | None, nice: int, idle: bool) -> dict[str, Any]:
    """Lower this process's CPU priority and bound its threads, so a background job (a refit)
    beside the live daemon does not starve it; returns what holds now ({threads, nice,
    policy}). Call before torch is imported (OpenMP reads its thread count from the
    environment once, and its threads inherit the policy of the thread that starts them).

    `idle` puts the process under SCHED_IDLE where the kernel has it (Linux): it runs only on
    CPU time the line leaves over. Under nice alone it still gets a weighted share of a busy
    core (110 against the worker's 1024 at nice 10) and its wake-ups delay the worker's
    batches (BENCHMARKS.md, half load: the line's latency median 148 → 237 ms during a niced
    refit, 127 → 144 ms during an idle one).
    So `threads` None means every core under SCHED_IDLE, one core otherwise."""
    niceness = os.nice(nice)
    policy = "normal"
    if idle and hasattr(os, "SCHED_IDLE"):
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        policy = "idle"
    threads = threads or (host_cores() if policy == "idle" else 1)
    set_threads(threads)
    torch_threads(threads)
    import torch

    return {"threads": torch.get_num_threads(), "nice": niceness, "policy": policy}
