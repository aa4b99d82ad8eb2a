"""clipft.threads: the intra-op thread count follows the CPUs other processes leave, now and between
epochs, unless the user pinned it."""
import os
import subprocess
import sys
import time

import pytest
import torch

from clipft import threads


def test_plan_leaves_the_busy_cpus_alone():
    plan = threads.plan_cpu_threads
    assert plan(2, 0.0)[0] == 2  # an idle 2-core machine: both
    assert plan(2, 0.2)[0] == 2  # a shell or a test runner waking up now and then
    assert plan(2, 2.0)[0] == 1  # two busy processes on 2 cores: 1 thread, never 0
    assert plan(2, 1.0)[0] == 1
    assert plan(2, 19.0)[0] == 1
    assert plan(16, 4.2)[0] == 12
    assert plan(16, 20.0)[0] == 1
    assert plan(4, None)[0] == 4  # unknown (no /proc): every CPU


def test_configure_honours_the_user_and_sleeps_while_waiting():
    env = {"OMP_NUM_THREADS": "3"}
    assert threads.configure_cpu_threads(env)[0] == 3 and env["OMP_WAIT_POLICY"] == "PASSIVE"
    env = {"CLIPFT_THREADS": "1", "OMP_WAIT_POLICY": "ACTIVE"}
    assert threads.configure_cpu_threads(env)[0] == 1 and env["OMP_NUM_THREADS"] == "1" and env["OMP_WAIT_POLICY"] == "ACTIVE"


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs Linux /proc")
def test_busy_elsewhere_sees_competitors_started_just_before():
    # Two CPU-bound processes that are not our children (double fork: their parent is gone), started
    # 0.5 s before the sample: the 1-minute load average would not show them yet.
    code = "import time; t = time.time() + 20\nwhile time.time() < t: pass"
    one = f"{sys.executable} -c '{code}' </dev/null >/dev/null 2>&1 & echo $!"  # no pipe held open: run returns
    spawn = f"{one}; {one}"
    pids = [int(p) for p in subprocess.run(["sh", "-c", spawn], capture_output=True, text=True).stdout.split()]
    try:
        time.sleep(0.5)
        busy = threads.busy_elsewhere()
        assert busy is not None and busy >= 1.5  # other work on the machine can only add to it
        assert threads.plan_cpu_threads(2, busy)[0] == 1
    finally:
        for pid in pids:
            os.kill(pid, 9)


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs Linux /proc")
def test_our_own_children_are_not_competitors(monkeypatch):
    # A DataLoader worker is ours: a spinning child must not count against its parent.
    child = subprocess.Popen([sys.executable, "-c", "import time; t = time.time() + 20\nwhile time.time() < t: pass"])
    try:
        time.sleep(0.5)
        me = os.getpid()
        with open(f"/proc/{child.pid}/stat", "rb") as f:
            assert int(f.read().rsplit(b")", 1)[1].split()[1]) == me
        monkeypatch.setattr(os, "listdir", lambda path, real=os.listdir: (
            [str(child.pid)] if path == "/proc" else real(path)))  # only the child is on the machine
        assert threads._runnable_elsewhere(me) == 0
        assert threads._runnable_elsewhere(me + 1) >= 1  # ... and to anyone else it is a competitor
    finally:
        child.kill()


def test_replan_follows_the_machine_only_when_clipft_chose(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", str(before)))  # restored after
    monkeypatch.setattr(threads, "available_cpus", lambda: 2)
    try:
        monkeypatch.setattr(threads, "_chosen", str(before))  # a count clipft planned
        monkeypatch.setattr(threads, "busy_elsewhere", lambda: 2.0)
        assert threads.replan() == 1 and torch.get_num_threads() == 1
        assert threads.replan() is None  # unchanged: nothing to do
        monkeypatch.setattr(threads, "busy_elsewhere", lambda: 0.0)
        assert threads.replan() == 2 and torch.get_num_threads() == 2
        monkeypatch.setattr(threads, "_chosen", None)  # CLIPFT_THREADS / OMP_NUM_THREADS: the user's count stays
        monkeypatch.setattr(threads, "busy_elsewhere", lambda: 2.0)
        assert threads.replan() is None and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
