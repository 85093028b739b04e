"""A busy machine is noticed by imagepiece bench (issue 13, item 4)."""

import json
import os
import subprocess
import sys
import time

import pytest

from imagepiece.measure import busy
from imagepiece.measure.busy import CpuReading, judge, others_cores, parse_proc_stat

STAT = """cpu  300 0 100 5000 10 0 5 0 0 0
cpu0 100 1 50 2000 5 2 3 4 0 0
cpu1 200 0 50 3000 5 0 2 0 0 0
cpu10 999 0 0 0 0 0 0 0 0 0
intr 12345 0 0
"""


def test_parse_proc_stat_sums_busy_ticks_of_our_cpus():
    # user nice system irq softirq steal; idle and iowait are not busy; cpu10 is not cpu1
    assert parse_proc_stat(STAT, [0]) == 100 + 1 + 50 + 2 + 3 + 4
    assert parse_proc_stat(STAT, [1]) == 200 + 50 + 2
    assert parse_proc_stat(STAT, [0, 1]) == 160 + 252
    assert parse_proc_stat(STAT, [5]) == 0


def test_others_cores_subtracts_our_own_time():
    assert others_cores(CpuReading(0.0, 10.0, 1.0), CpuReading(2.0, 13.0, 2.0)) == pytest.approx(1.0)
    assert others_cores(CpuReading(0.0, 10.0, 1.0), CpuReading(2.0, 11.0, 2.0)) == 0.0
    assert others_cores(CpuReading(0.0, 10.0, 1.0), CpuReading(0.5, 13.0, 1.0)) is None  # too short
    assert others_cores(CpuReading(0.0, None, 1.0), CpuReading(5.0, None, 2.0)) is None


@pytest.mark.parametrize("cpus, threads, others, calib, expect", [
    (2, 2, 0.1, [5e-3] * 5, []),  # idle
    (2, 2, 0.9, [5e-3] * 5, ["other processes used 0.90"]),  # one core taken from us
    (2, 1, 0.9, [5e-3] * 5, []),  # the other used the core we left free
    (2, 1, 1.4, [5e-3] * 5, ["other processes used 1.40"]),
    (16, 4, 12.2, [5e-3] * 5, []),
    (16, 4, 12.3, [5e-3] * 5, ["other processes"]),
    (2, 2, None, [5e-3] * 5, []),  # no /proc/stat
    (2, 2, 0.0, [5e-3, 5e-3, 5e-3, 5e-3, 50e-3], []),  # one hiccup is not a busy spell
    (2, 2, 0.0, [5e-3, 5e-3, 5e-3, 9e-3, 9e-3], ["calibration kernel timed between rounds was 1.8x slower"]),
    (2, 2, 1.5, [5e-3, 5e-3, 9e-3, 9e-3], ["other processes", "calibration kernel"]),
])
def test_judge(cpus, threads, others, calib, expect):
    reasons = judge(cpus, threads, others, calib)
    assert len(reasons) == len(expect)
    for reason, words in zip(reasons, expect, strict=True):
        assert words in reason


def test_monitor_window_is_long_enough_to_tell():
    monitor = busy.BusyMonitor(threads=1)
    monitor.start()
    report = monitor.stop()
    assert report.seconds >= busy.MIN_WINDOW_S and len(report.calibration_ms) >= 2
    d = report.as_dict()
    assert d["busy"] == bool(d["reasons"]) and d["cpus"] >= 1 and d["threads"] == 1


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="needs Linux /proc/stat")
def test_cpu_spinning_processes_are_noticed(tmp_path):
    """The benchmark on every CPU it may use, beside twice as many CPU-spinning processes."""
    from typer.testing import CliRunner

    from imagepiece.cli import app

    ncpu = len(busy._our_cpus())
    spin = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2 * ncpu)]
    out = tmp_path / "r.json"
    try:
        time.sleep(0.2)
        res = CliRunner().invoke(app, [
            "bench", "--model", "vit_tiny_patch16_224", "--model-arg", "img_size=32",
            "--model-arg", "patch_size=4", "--model-arg", "embed_dim=64", "--model-arg", "depth=2",
            "--model-arg", "num_heads=2", "--method", "evit", "--no-limit", "--batch", "2",
            "--threads", str(ncpu), "--warmup", "0", "--runs", "2", "--json", str(out)])
    finally:
        for p in spin:
            p.kill()
            p.wait()
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "busy machine" in text and "other processes used" in text
    record = json.loads(out.read_text())["busy"][0]
    assert record["busy"] and record["others_cores"] > 0.25 and record["cpus"] == ncpu
