"""The GPU suite's step runner (benchmarks/gpu_steps.py) and the suite on a machine without a GPU."""
import json
import os
import subprocess
import sys
import tarfile
import time

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import gpu_steps  # noqa: E402


def _saved(results):
    with open(os.path.join(results, gpu_steps.RESULTS_NAME)) as f:
        return json.load(f)


def test_pass_fail_timeout_and_skip_are_recorded_as_they_go(tmp_path):
    res = str(tmp_path / "res")
    suite = gpu_steps.Suite.init(res, budget_s=300)
    py = sys.executable

    rec = suite.step("ok", [py, "-c", "print('fig 1.5'); print('gpu_suite_facts: {\"gpu\": false}')"], 30)
    assert rec["status"] == "pass" and rec["rc"] == 0 and "fig 1.5" in rec["tail"]
    assert suite.data["facts"] == {"gpu": False}
    assert [s["name"] for s in _saved(res)["steps"]] == ["ok"]  # on disk before the next step runs

    rec = suite.step("bad", [py, "-c", "import sys; print('boom'); sys.exit(3)"], 30)
    assert rec["status"] == "fail" and rec["rc"] == 3 and rec["tail"][-1] == "boom"

    # The step and a child it started must both end at the limit.
    marker = tmp_path / "child_alive"
    child = f"import time; time.sleep(4); open({str(marker)!r}, 'w').write('x')"
    t0 = time.monotonic()
    rec = suite.step("slow", [py, "-c", f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {child!r}]); time.sleep(60)"], 1.5)
    assert rec["status"] == "timeout" and time.monotonic() - t0 < 15
    time.sleep(4.5)
    assert not marker.exists(), "the timed-out step's child kept running"

    rec = suite.step("gpu_only", [py, "-c", "raise SystemExit(1)"], 30, needs=["gpu"])
    assert rec["status"] == "skipped: no GPU" and rec["rc"] is None
    rec = suite.step("faiss_only", [py, "-c", "raise SystemExit(1)"], 30, needs=["faiss"])
    assert rec["status"] == "skipped: faiss not installed"
    rec = suite.step("after_ok", [py, "-c", "raise SystemExit(1)"], 30, if_failed="ok")
    assert rec["status"] == "skipped: ok: pass"
    rec = suite.step("after_bad", [py, "-c", "print('fallback')"], 30, if_failed="bad")
    assert rec["status"] == "pass"
    rec = suite.step("missing_program", ["/nonexistent/program"], 30)
    assert rec["status"] == "fail" and rec["rc"] == 127

    saved = _saved(res)
    assert [(s["name"], s["status"]) for s in saved["steps"]] == [
        ("ok", "pass"), ("bad", "fail"), ("slow", "timeout"), ("gpu_only", "skipped: no GPU"),
        ("faiss_only", "skipped: faiss not installed"), ("after_ok", "skipped: ok: pass"), ("after_bad", "pass"),
        ("missing_program", "fail")]
    table = suite.table()
    for name in ("ok", "bad", "slow", "gpu_only"):
        assert name in table


def test_budget_caps_limits_and_skips_when_spent(tmp_path):
    res = str(tmp_path / "res")
    suite = gpu_steps.Suite.init(res, budget_s=gpu_steps.MIN_STEP_S + 2)
    rec = suite.step("capped", [sys.executable, "-c", "pass"], 600)
    assert rec["status"] == "pass" and rec["limit_s"] <= gpu_steps.MIN_STEP_S + 2
    suite.data["start_epoch"] -= 5  # as if five seconds of the budget went by
    rec = suite.step("late", [sys.executable, "-c", "pass"], 600)
    assert rec["status"] == "skipped: budget spent"


def test_figures_from_csv_and_junit(tmp_path):
    res = str(tmp_path / "res")
    suite = gpu_steps.Suite.init(res, budget_s=300, log_dir=str(tmp_path / "logs"), pack=True)
    csv_path, xml_path = tmp_path / "rows.csv", tmp_path / "junit.xml"
    script = (
        f"open({str(csv_path)!r}, 'w').write('provider,median_s,rate\\nours,0.5,2.0\\nfloor,0.25,4.0\\n');"
        f"open({str(xml_path)!r}, 'w').write('<testsuites><testsuite tests=\"3\" failures=\"1\" errors=\"0\" skipped=\"1\">"
        "<testcase classname=\"t\" name=\"a\"/><testcase classname=\"t\" name=\"b\"><failure/></testcase>"
        "<testcase classname=\"t\" name=\"c\"><skipped/></testcase></testsuite></testsuites>')"
    )
    rec = suite.step("bench", [sys.executable, "-c", script], 30, csv_files=[str(csv_path), str(tmp_path / "none.csv")],
                     junit=str(xml_path))
    figs = rec["figures"]
    assert figs["rows.csv"] == [{"provider": "ours", "median_s": "0.5", "rate": "2.0"},
                                {"provider": "floor", "median_s": "0.25", "rate": "4.0"}]
    assert figs["none.csv"] == "not written"
    assert figs["junit"]["tests"] == 3 and figs["junit"]["failures"] == 1 and figs["junit"]["failed"] == ["t::b"]
    assert os.path.isfile(os.path.join(res, "logs.tar.gz"))  # logs kept apart are packed after each step
    with tarfile.open(os.path.join(res, "logs.tar.gz")) as tar:
        assert tar.getnames() == ["bench.log"]
    suite.finish()
    assert _saved(res)["finished"] is not None
    assert "ours" in suite.table()


def test_packed_logs_leave_out_the_largest_files_past_the_cap(tmp_path, monkeypatch):
    logs = tmp_path / "logs"
    suite = gpu_steps.Suite.init(str(tmp_path / "res"), budget_s=300, log_dir=str(logs), pack=True)
    (logs / "small.log").write_text("x" * 100)
    (logs / "trace.json").write_bytes(os.urandom(300_000))  # incompressible
    (logs / "huge.json").write_bytes(os.urandom(600_000))
    monkeypatch.setattr(gpu_steps, "PACK_MAX_BYTES", 200_000)
    suite.pack_logs()
    with tarfile.open(tmp_path / "res" / "logs.tar.gz") as tar:
        names = tar.getnames()
    assert "small.log" in names and "huge.json" not in names
    assert suite.data["packed_left_out"][-1] == "huge.json"


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the suite runs for minutes")
def test_suite_without_gpu_skips_gpu_steps_and_exits_0(tmp_path):
    res = tmp_path / "res"
    env = dict(os.environ, ICONS_GPU_RESULTS=str(res), PYTHON=sys.executable)
    env.pop("OUT", None)
    proc = subprocess.run(["bash", os.path.join(REPO, "benchmarks", "gpu_suite.sh")], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    saved = _saved(str(res))
    status = {s["name"]: s["status"] for s in saved["steps"]}
    assert status["env"] == "pass" and saved["facts"]["gpu"] is False
    for name in ("build", "pytest_cuda", "featurize_7b", "kernels", "influence", "projection", "profile"):
        assert status[name] == "skipped: no GPU", (name, status[name])
    assert status["ext_check"] == "pass"  # icons_fast and icons_fast.kernels import here
    assert saved["finished"] is not None and (res / "summary.txt").read_text().startswith("step")
