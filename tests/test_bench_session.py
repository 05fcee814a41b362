"""bench/gpu_session.py: the one-call plan for the GPU machine, run on the CPU (the CUDA-only steps are recorded as
skipped), its deadlines, and a step that outlives its deadline being ended with its children."""

from __future__ import annotations

import io
import json
import os
import re
import sys
import time

from bench.gpu_session import Step, deadline_for, main, plan, run_step


def test_the_tiny_session_runs_every_cpu_step_and_writes_what_the_device_tool_returns(tiny_data, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["--tiny", "--device", "cpu", "--out", str(out), "--bench-data", str(tiny_data),
               "--curve-data", str(tmp_path / "absent")])
    printed = capsys.readouterr().out
    assert rc == 0, (out / "session.log").read_text()[-3000:]
    session = json.loads((out / "session.json").read_text())
    steps = session["steps"]
    assert list(steps) == ["env", "speed", "curve", "head_loss", "tests"]
    for name in ("env", "speed", "head_loss"):
        assert steps[name]["exit"] == 0 and not steps[name]["killed"], name
    assert steps["curve"]["skipped"] == steps["tests"]["skipped"] == "needs CUDA"
    assert session["install"]["installed"] is False  # deepspeed is importable here: nothing to install
    assert session["wall_s"] <= session["budget_s"]
    # the speed step got a budget of its own, inside its deadline
    argv = steps["speed"]["command"]
    assert float(argv[argv.index("--budget-s") + 1]) < steps["speed"]["deadline_s"]
    (row,) = json.loads((out / "speed.json").read_text())["rows"]
    assert row["system"] == "cloze" and row["tokens_per_s"] > 0
    assert {r["path"] for r in json.loads((out / "head.json").read_text())["table"]} == {"plain", "fused"}
    # summary.md holds each step's table; the device tool returns at most 8 files with plain names
    summary = (out / "summary.md").read_text()
    assert "| cloze | tiny-bert-64 |" in summary and "| fused |" in summary and "## curve: needs CUDA" in summary
    assert summary.strip() == printed.strip()
    files = sorted(p.name for p in out.iterdir())
    assert files == ["head.json", "session.json", "session.log", "speed.json", "summary.md"]
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", f) for f in files)


def test_a_step_past_its_deadline_is_ended_with_its_children(tmp_path):
    pid_file = tmp_path / "child.pid"
    code = ("import subprocess, sys, time\n"
            "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
            f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
            "print('started', flush=True)\n"
            "time.sleep(120)\n")
    step = Step("slow", [sys.executable, "-c", code], share_s=1, cap_s=1)
    log = io.StringIO()
    t0 = time.perf_counter()
    run_step(step, 3.0, log)
    assert time.perf_counter() - t0 < 20
    assert step.result["killed"] and step.result["exit"] != 0
    assert "started" in log.getvalue() and "deadline 3 s reached" in log.getvalue()
    child = int(pid_file.read_text())
    for _ in range(50):  # the grandchild was in the step's process group: it is gone too
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"the step's child {child} outlived the step")

    quick = Step("quick", [sys.executable, "-c", "print('| a | b |')"], share_s=1, cap_s=5)
    run_step(quick, 5.0, log)
    assert quick.result == {**quick.result, "exit": 0, "killed": False, "table": ["| a | b |"]}


def test_deadlines_leave_every_later_step_its_share(tmp_path):
    steps = plan(tmp_path, tiny=False, device="cuda", bench_data=tmp_path, curve_data=tmp_path, budget_s=560)
    names = [s.name for s in steps]
    assert names == ["env", "speed", "curve", "head_loss", "tests"]
    later = {s.name: sum(t.share_s for t in steps[i + 1:]) for i, s in enumerate(steps)}
    # Each step, run to its deadline, still leaves every later step its share.
    left = 560.0
    for i, s in enumerate(steps):
        d = deadline_for(steps, i, left)
        assert 0 < d <= s.cap_s and d <= left
        assert left - d >= later[s.name] or d == s.share_s
        left -= d
    assert left >= 0
    # The speed rows get the most; with little time left a step gets what is left, never more.
    assert deadline_for(steps, 1, 560) == 560 - later["speed"] > 300
    assert deadline_for(steps, 4, 10) == 10
    assert deadline_for(steps, 2, 400) == steps[2].cap_s
