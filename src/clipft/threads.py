"""How many CPU threads PyTorch gets, decided before torch is imported (no torch import here).

Measured on a 2-core machine shared with CPU-bound processes (docs/measurements.md, "A busy machine"): with two
OpenMP threads per process, every parallel region waits at its barrier for the thread the scheduler
has parked, and libgomp's default (active) wait policy spins meanwhile, burning the CPU the others
need: the training step ran 5x slower and used 5x the CPU time of a single-threaded one. So:
threads = the CPUs this process may use (affinity mask), fewer only on a machine whose load already
fills every CPU (then one per CPU the load leaves, at least 1), and threads that wait sleep
(OMP_WAIT_POLICY=PASSIVE) instead of spinning. A load below the CPU count keeps every CPU: the load
average counts the caller's own recent work (a shell, the test runner), and a thread count that
followed it would make an idle machine's results depend on what ran a minute before.
"""

from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger(__name__)

THREADS_ENV = "CLIPFT_THREADS"  # a user's explicit choice; OMP_NUM_THREADS is honoured too


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask: a container's or `taskset`'s limit), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def load_average() -> float | None:
    """The 1-minute load average (runnable processes, ours included once they run); None where unknown."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def plan_cpu_threads(cpus: int, load: float | None) -> tuple[int, str]:
    """(intra-op threads, why) for `cpus` usable CPUs with `load` runnable processes already on them:
    every CPU while the load is below `cpus`; on a machine the load already fills, `cpus` less the
    excess load, rounded down, between 1 and `cpus`. Unknown load = all CPUs."""
    if load is None:
        return cpus, f"{cpus} CPU(s) available, load unknown"
    threads = cpus if load < cpus else max(1, min(cpus, int(cpus - (load - cpus) - 0.5)))
    if threads == cpus:
        return threads, f"{cpus} CPU(s) available, load {load:.1f}"
    return threads, (f"{cpus} CPU(s) available but load {load:.1f}: {threads} thread(s), so that no thread "
                     "waits at a barrier for one the scheduler has parked")


def configure_cpu_threads(environ: dict | None = None) -> tuple[int, str]:
    """Set OMP_NUM_THREADS / MKL_NUM_THREADS (unless the user did, or CLIPFT_THREADS says) and
    OMP_WAIT_POLICY=PASSIVE (unless set) for the torch this process imports next; if torch is
    already imported, its intra-op pool is resized too. DataLoader workers inherit the variables
    and PyTorch gives each of them one thread. Returns (threads, why)."""
    env = os.environ if environ is None else environ
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if env.get(THREADS_ENV, "").strip():
        threads, why = max(1, int(env[THREADS_ENV])), f"{THREADS_ENV}={env[THREADS_ENV]}"
    elif env.get("OMP_NUM_THREADS", "").strip():
        try:
            threads, why = max(1, int(env["OMP_NUM_THREADS"])), f"OMP_NUM_THREADS={env['OMP_NUM_THREADS']}"
        except ValueError:
            threads, why = plan_cpu_threads(available_cpus(), load_average())
    else:
        threads, why = plan_cpu_threads(available_cpus(), load_average())
    env["OMP_NUM_THREADS"] = str(threads)
    env.setdefault("MKL_NUM_THREADS", str(threads))
    torch = sys.modules.get("torch")
    if torch is not None and environ is None:
        torch.set_num_threads(threads)
    log.debug("CPU threads: %d (%s)", threads, why)
    return threads, why
