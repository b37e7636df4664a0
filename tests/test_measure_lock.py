"""The node-wide reader/writer lock, with real processes: the measurement waits for compute slots in flight,
holds back new ones, and nothing deadlocks."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from hwnas.evaluators.measure import lock
from hwnas.evaluators.measure.lock import compute_slot, measure_exclusive

HEADER = "import time, sys\nfrom hwnas.evaluators.measure.lock import compute_slot, measure_exclusive\n"


@pytest.fixture(autouse=True)
def lock_dir(tmp_path, monkeypatch) -> Path:
    d = tmp_path / "locks"
    monkeypatch.setenv("HWNAS_LOCK_DIR", str(d))
    return d


def spawn(code: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", HEADER + code], env=dict(os.environ))


def wait_for(path: Path, timeout: float = 30.0) -> float:
    end = time.monotonic() + timeout
    while not path.exists() or not path.read_text():
        assert time.monotonic() < end, f"{path.name} never appeared"
        time.sleep(0.005)
    return float(path.read_text())


def test_lock_files_live_in_the_configured_dir(lock_dir):
    with compute_slot():
        pass
    with measure_exclusive():
        pass
    assert {p.name for p in lock_dir.iterdir()} == {lock.GATE, lock.DATA}


def test_reentrance_within_a_process():
    with compute_slot(), compute_slot():
        pass
    with measure_exclusive(), measure_exclusive(), compute_slot():  # compute inside a measurement: a no-op
        pass
    with compute_slot(), pytest.raises(RuntimeError, match="inside compute_slot") as info:
        with measure_exclusive():
            pass
    assert "\n" not in str(info.value)
    with measure_exclusive():  # and the failed attempt left nothing held
        pass


def test_writer_waits_for_a_readers_slot_to_end(tmp_path):
    r = spawn(f"with compute_slot():\n"
              f"    open({str(tmp_path / 'in')!r}, 'w').write(str(time.monotonic()))\n"
              f"    time.sleep(0.6)\n"
              f"    open({str(tmp_path / 'out')!r}, 'w').write(str(time.monotonic()))\n")
    wait_for(tmp_path / "in")
    with measure_exclusive():
        entered = time.monotonic()
    out = wait_for(tmp_path / "out")
    assert r.wait(30) == 0
    assert entered >= out


def test_readers_arriving_while_a_writer_waits_are_held_until_it_is_done(tmp_path):
    r1 = spawn(f"with compute_slot():\n"
               f"    open({str(tmp_path / 'r1_in')!r}, 'w').write(str(time.monotonic()))\n"
               f"    time.sleep(0.8)\n"
               f"    open({str(tmp_path / 'r1_out')!r}, 'w').write(str(time.monotonic()))\n")
    wait_for(tmp_path / "r1_in")
    times: dict[str, float] = {}

    def writer() -> None:
        with measure_exclusive():
            times["enter"] = time.monotonic()
            time.sleep(0.4)
            times["exit"] = time.monotonic()

    w = threading.Thread(target=writer)
    w.start()
    time.sleep(0.2)  # the writer is now queued behind r1 (r1 holds its slot for 0.8 s)
    assert "enter" not in times
    r2 = spawn(f"t = time.monotonic()\n"
               f"with compute_slot():\n"
               f"    open({str(tmp_path / 'r2_in')!r}, 'w').write(str(time.monotonic()))\n")
    r2_in = wait_for(tmp_path / "r2_in")
    w.join(30)
    assert r1.wait(30) == 0 and r2.wait(30) == 0
    assert times["enter"] >= wait_for(tmp_path / "r1_out")  # waited for the slot in flight ...
    assert r2_in >= times["exit"]  # ... and r2, arriving later, did not overtake the waiting writer


def test_three_readers_and_a_writer_looping_neither_deadlock_nor_overlap(tmp_path):
    reader = ("log = []\n"
              "for _ in range(150):\n"
              "    with compute_slot():\n"
              "        a = time.monotonic(); time.sleep(0.002); log.append((a, time.monotonic()))\n"
              "    time.sleep(0.0005)\n"
              "open(sys.argv[1] if len(sys.argv) > 1 else {path!r}, 'w').write(repr(log))\n")
    writer = ("log = []\n"
              "for _ in range(25):\n"
              "    with measure_exclusive():\n"
              "        a = time.monotonic(); time.sleep(0.005); log.append((a, time.monotonic()))\n"
              "    time.sleep(0.01)\n"
              "open({path!r}, 'w').write(repr(log))\n")
    procs = [spawn(reader.format(path=str(tmp_path / f"r{i}"))) for i in range(3)]
    procs.append(spawn(writer.format(path=str(tmp_path / "w"))))
    for p in procs:
        assert p.wait(timeout=120) == 0  # a deadlock shows up as a timeout here
    import ast

    writes = ast.literal_eval((tmp_path / "w").read_text())
    reads = [iv for i in range(3) for iv in ast.literal_eval((tmp_path / f"r{i}").read_text())]
    assert len(writes) == 25 and len(reads) == 450
    overlaps = [(r, w) for r in reads for w in writes if r[0] < w[1] and w[0] < r[1]]
    assert overlaps == []


def test_training_callback_holds_the_slot_per_batch_only(lock_dir):
    from hwnas.evaluators.train import ComputeSlot

    probe = ("import fcntl, os\n"
             f"fd = os.open({str(lock_dir / lock.DATA)!r}, os.O_RDWR)\n"
             "try:\n    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB); print('free')\n"
             "except BlockingIOError:\n    print('held')\n")

    def state() -> str:
        return subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip()

    cb = ComputeSlot()
    cb.on_train_batch_start(None, None, None, 0)
    assert state() == "held"
    cb.on_train_batch_end(None, None, None, None, 0)
    assert state() == "free"
    cb.on_train_batch_start(None, None, None, 1)
    cb.on_exception(None, None, RuntimeError("boom"))  # a failing step releases too
    assert state() == "free"
