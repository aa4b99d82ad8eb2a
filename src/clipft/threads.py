"""How many CPU threads PyTorch gets, decided before torch is imported (no torch import here).

Measured on a 2-core machine shared with CPU-bound processes (docs/measurements.md, "A busy machine"): with two
OpenMP threads per process, every parallel region waits at its barrier for the thread the scheduler
has parked, and libgomp's default (active) wait policy spins meanwhile, burning the CPU the others
need: the training step ran 5x slower and used 5x the CPU time of a single-threaded one. So:
threads = the CPUs this process may use (affinity mask) less the threads OTHER processes are running
right now (sampled from /proc a few times over ~0.1 s; our own threads and our child processes, such
as DataLoader workers, do not count), at least 1; and threads that wait sleep (OMP_WAIT_POLICY=PASSIVE)
instead of spinning. The load average is not used: it trails the machine by a minute (two competitors
started just before a run were invisible to it) and counts the caller's own work.

The count is decided when a command starts and again at every epoch (`replan`), so a run adapts when
other work starts or stops. Bit-for-bit equal results across runs need one thread count: set
CLIPFT_THREADS (or OMP_NUM_THREADS) to pin it; then nothing is re-planned.
"""

from __future__ import annotations

import logging
import os
import sys
import time

log = logging.getLogger(__name__)

THREADS_ENV = "CLIPFT_THREADS"  # a user's explicit choice; OMP_NUM_THREADS is honoured too


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask: a container's or `taskset`'s limit), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def _runnable_elsewhere(me: int) -> int | None:
    """Threads of other processes in state R (running or waiting for a CPU) right now; None without /proc."""
    try:
        pids = [name for name in os.listdir("/proc") if name.isdigit()]
    except OSError:
        return None
    n = 0
    for pid in pids:
        if int(pid) == me:
            continue
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
            for tid in tasks:
                with open(f"/proc/{pid}/task/{tid}/stat", "rb") as f:
                    stat = f.read()
                fields = stat[stat.rindex(b")") + 2:].split()  # comm may hold spaces and parentheses
                if fields[0] == b"R" and int(fields[1]) != me:  # fields[1]: ppid; our workers are ours
                    n += 1
        except (OSError, ValueError, IndexError):  # a process that just ended
            continue
    return n


def busy_elsewhere(samples: int = 5, interval: float = 0.02) -> float | None:
    """Mean number of other processes' runnable threads over `samples` looks `interval` s apart
    (about 0.1 s in all); None where /proc is unavailable (not Linux)."""
    me, seen = os.getpid(), []
    for i in range(samples):
        n = _runnable_elsewhere(me)
        if n is None:
            return None
        seen.append(n)
        if i + 1 < samples:
            time.sleep(interval)
    return sum(seen) / len(seen)


def plan_cpu_threads(cpus: int, busy: float | None) -> tuple[int, str]:
    """(intra-op threads, why) for `cpus` usable CPUs while other processes run `busy` threads:
    the CPUs they leave, at least 1. Unknown = all CPUs."""
    if busy is None:
        return cpus, f"{cpus} CPU(s) available, other work unknown"
    threads = max(1, min(cpus, cpus - round(busy)))
    if threads == cpus:
        return threads, f"{cpus} CPU(s) available, {busy:.1f} busy elsewhere"
    return threads, (f"{cpus} CPU(s) available, {busy:.1f} busy with other work: {threads} thread(s), so that "
                     "no thread waits at a barrier for one the scheduler has parked")


# The OMP_NUM_THREADS value clipft planned itself in this process; None while the count is the user's
# (CLIPFT_THREADS / OMP_NUM_THREADS) or not planned yet. Only a planned count is re-planned (`replan`).
_chosen: str | None = None


def configure_cpu_threads(environ: dict | None = None) -> tuple[int, str]:
    """Set OMP_NUM_THREADS / MKL_NUM_THREADS (unless the user did, or CLIPFT_THREADS says) and
    OMP_WAIT_POLICY=PASSIVE (unless set) for the torch this process imports next; if torch is
    already imported, its intra-op pool is resized too. DataLoader workers inherit the variables
    and PyTorch gives each of them one thread. Returns (threads, why)."""
    global _chosen
    env = os.environ if environ is None else environ
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    omp = env.get("OMP_NUM_THREADS", "").strip()
    users_omp = omp and not (environ is None and omp == _chosen)  # not the value an earlier plan here set
    planned = False
    if env.get(THREADS_ENV, "").strip():
        threads, why = max(1, int(env[THREADS_ENV])), f"{THREADS_ENV}={env[THREADS_ENV]}"
    elif users_omp and omp.isdigit():
        threads, why = max(1, int(omp)), f"OMP_NUM_THREADS={omp}"
    else:
        threads, why = plan_cpu_threads(available_cpus(), busy_elsewhere())
        planned = True
    env["OMP_NUM_THREADS"] = str(threads)
    env.setdefault("MKL_NUM_THREADS", str(threads))
    if environ is None:  # this process's own settings (a dict given by a caller changes nothing here)
        _chosen = str(threads) if planned else None
        torch = sys.modules.get("torch")
        if torch is not None:
            torch.set_num_threads(threads)
    log.debug("CPU threads: %d (%s)", threads, why)
    return threads, why


def replan() -> int | None:
    """Between epochs: the thread count again, for the work running now. Only when clipft chose the
    count (not CLIPFT_THREADS / OMP_NUM_THREADS) and torch is loaded; returns the new count when it
    changed, else None. Costs about 0.1 s."""
    global _chosen
    torch = sys.modules.get("torch")
    if _chosen is None or torch is None:
        return None
    threads, why = plan_cpu_threads(available_cpus(), busy_elsewhere())
    if threads == torch.get_num_threads():
        return None
    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = _chosen = str(threads)  # and DataLoader workers started from now on
    log.info("CPU threads: %d (%s)", threads, why)
    return threads
