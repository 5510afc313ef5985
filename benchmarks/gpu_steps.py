"""Step runner of the GPU suite (``benchmarks/gpu_suite.sh``): one JSON file, written as it goes.

Each step is one command run under a time limit inside an overall budget. Its
result is appended to ``<results>/gpu_suite.json`` as soon as it ends (and
marked ``running`` before it starts, so a suite killed from outside still says
where it stopped)::

    {"started": ISO time, "start_epoch": s, "budget_s": s, "facts": {...},
     "steps": [{"name", "status", "seconds", "rc", "limit_s", "command",
                "log", "tail", "figures"}], "finished": ISO time or null}

``status`` is ``pass`` | ``fail`` | ``timeout`` | ``skipped: <reason>``.
A step is skipped, never run, when a fact it needs is false (``--needs gpu``:
``facts["gpu"]``), when the step it depends on did not fail (``--if-failed
build``: run only when ``build`` ended ``fail`` or ``timeout``), or when less
than ``MIN_STEP_S`` of the budget is left. Facts come from the ``probe`` step:
any step may print one line ``gpu_suite_facts: {json}`` whose keys are merged
into ``facts``.

``figures``: the rows of the CSV files a step names (``--csv``), the counts of
its JUnit XML (``--junit``), else nothing (its ``tail`` holds its last lines).

A timed-out step is ended with its whole process group (SIGTERM, then SIGKILL
after ``KILL_GRACE_S``), so test workers and compilers it spawned go too.

This module imports neither torch nor anything outside the standard library,
except in ``probe``, which runs under the interpreter being tested::

    python benchmarks/gpu_steps.py init RESULTS_DIR --budget 470 [--logs DIR] [--pack]
    python benchmarks/gpu_steps.py step RESULTS_DIR NAME --timeout 60 [--needs gpu,faiss] \
        [--if-failed STEP] [--csv FILE] [--junit FILE] [--env K=V] -- CMD ARGS...
    python benchmarks/gpu_steps.py probe          # prints the facts line (imports torch)
    python benchmarks/gpu_steps.py finish RESULTS_DIR   # marks the run finished, prints the table
    python benchmarks/gpu_steps.py table RESULTS_DIR
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ET

RESULTS_NAME = "gpu_suite.json"
FACTS_PREFIX = "gpu_suite_facts: "
MIN_STEP_S = 20  # a step given less than this would only record a timeout
KILL_GRACE_S = 10
TAIL_LINES = 25
PACK_MAX_BYTES = 14 << 20  # logs.tar.gz stays under this (the device tool returns files of at most 16 MiB)

# Why a step that needs a fact is skipped when the fact is false.
NEED_REASONS = {
    "gpu": "no GPU",
    "faiss": "faiss not installed",
    "nvcc": "nvcc not found",
    "cuda_ext": "CUDA extension cannot run here",
    "triton": "triton not installed",
}


def _now_iso() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


class Suite:
    """The results file of one suite run: load, change, write atomically."""

    def __init__(self, results_dir: str):
        self.dir = results_dir
        self.path = os.path.join(results_dir, RESULTS_NAME)
        with open(self.path) as f:
            self.data = json.load(f)

    @classmethod
    def init(cls, results_dir: str, budget_s: float, log_dir: str | None = None, pack: bool = False) -> "Suite":
        """Start a new results file (an old one in ``results_dir`` is replaced)."""
        os.makedirs(results_dir, exist_ok=True)
        log_dir = log_dir or os.path.join(results_dir, "logs")
        os.makedirs(log_dir, exist_ok=True)
        data = {
            "started": _now_iso(),
            "start_epoch": time.time(),
            "budget_s": float(budget_s),
            "log_dir": os.path.abspath(log_dir),
            "pack": bool(pack),
            "facts": {},
            "steps": [],
            "finished": None,
        }
        _write_json(os.path.join(results_dir, RESULTS_NAME), data)
        return cls(results_dir)

    def save(self) -> None:
        _write_json(self.path, self.data)

    def budget_left(self) -> float:
        return self.data["budget_s"] - (time.time() - self.data["start_epoch"])

    def find(self, name: str) -> dict | None:
        for s in self.data["steps"]:
            if s["name"] == name:
                return s
        return None

    def _record(self, rec: dict) -> None:
        """Replace the step of the same name, or append it; then write the file."""
        steps = self.data["steps"]
        for i, s in enumerate(steps):
            if s["name"] == rec["name"]:
                steps[i] = rec
                break
        else:
            steps.append(rec)
        self.save()

    def skip_reason(self, needs=(), if_failed: str | None = None) -> str | None:
        """Why a step must not run now, or None."""
        facts = self.data["facts"]
        for need in needs:
            if not facts.get(need):
                return NEED_REASONS.get(need, f"needs {need}")
        if if_failed is not None:
            dep = self.find(if_failed)
            if dep is None:
                return f"{if_failed} did not run"
            if dep["status"] not in ("fail", "timeout"):
                return f"{if_failed}: {dep['status']}"
        if self.budget_left() < MIN_STEP_S:
            return "budget spent"
        return None

    def step(self, name: str, cmd: list[str], timeout_s: float, needs=(), if_failed: str | None = None,
             csv_files=(), junit: str | None = None, env: dict | None = None) -> dict:
        """Run ``cmd`` as step ``name`` (or skip it); record and return its result."""
        rec = {"name": name, "command": " ".join(cmd), "status": None, "seconds": 0.0, "rc": None,
               "limit_s": None, "log": None, "tail": [], "figures": {}}
        why = self.skip_reason(needs, if_failed)
        if why is not None:
            rec["status"] = f"skipped: {why}"
            self._record(rec)
            return rec
        limit = max(1.0, min(float(timeout_s), self.budget_left()))
        log_path = os.path.join(self.data["log_dir"], f"{name}.log")
        rec.update(status="running", limit_s=round(limit, 1), log=log_path, started=_now_iso())
        self._record(rec)
        child_env = dict(os.environ)
        child_env["OUT"] = self.data["log_dir"]  # benchmarks' default outputs land beside the logs
        child_env.update(env or {})
        t0 = time.monotonic()
        rc, timed_out = _run_limited(cmd, limit, log_path, child_env)
        rec["seconds"] = round(time.monotonic() - t0, 1)
        rec["rc"] = rc
        rec["status"] = "timeout" if timed_out else ("pass" if rc == 0 else "fail")
        lines = _read_lines(log_path)
        rec["tail"] = lines[-TAIL_LINES:]
        for line in lines:
            if line.startswith(FACTS_PREFIX):
                try:
                    self.data["facts"].update(json.loads(line[len(FACTS_PREFIX):]))
                except json.JSONDecodeError:
                    rec["tail"].append(f"(unreadable facts line: {line[:200]})")
        rec["figures"] = _figures(csv_files, junit)
        self._record(rec)
        if self.data.get("pack"):
            self.pack_logs()
        return rec

    def finish(self) -> None:
        self.data["finished"] = _now_iso()
        self.data["total_s"] = round(time.time() - self.data["start_epoch"], 1)
        self.save()
        if self.data.get("pack"):
            self.pack_logs()

    def pack_logs(self) -> None:
        """``<results>/logs.tar.gz`` of the log folder, smallest files first; once the archive
        passes PACK_MAX_BYTES the remaining (largest) files are left out and listed."""
        target = os.path.join(self.dir, "logs.tar.gz")
        tmp = target + ".tmp"
        root = self.data["log_dir"]
        files = sorted((os.path.getsize(os.path.join(d, fn)), os.path.relpath(os.path.join(d, fn), root))
                       for d, _, names in os.walk(root) for fn in names)
        left_out = []
        with tarfile.open(tmp, "w:gz") as tar:
            for _, rel in files:
                if left_out or os.path.getsize(tmp) > PACK_MAX_BYTES:
                    left_out.append(rel)
                    continue
                tar.add(os.path.join(root, rel), arcname=rel)
        os.replace(tmp, target)
        if left_out != self.data.get("packed_left_out", []):
            self.data["packed_left_out"] = left_out
            self.save()

    def table(self) -> str:
        """The closing table: one line per step, then each step's figures."""
        d = self.data
        out = [f"{'step':<16}{'status':<34}{'s':>7}"]
        for s in d["steps"]:
            out.append(f"{s['name']:<16}{s['status'][:33]:<34}{s['seconds']:>7.1f}")
        total = d.get("total_s", round(time.time() - d["start_epoch"], 1))
        out.append(f"{'total':<50}{total:>7.1f}   (budget {d['budget_s']:.0f} s)")
        facts = d["facts"]
        if facts:
            out.append("facts: " + ", ".join(f"{k}={v}" for k, v in sorted(facts.items())))
        for s in d["steps"]:
            for key, val in s.get("figures", {}).items():
                out.append("")
                out.append(f"{s['name']}: {key}")
                out.extend("  " + line for line in _format_figures(val))
        return "\n".join(out)


def _write_json(path: str, data: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def _read_lines(path: str) -> list[str]:
    try:
        with open(path, errors="replace") as f:
            return f.read().splitlines()
    except OSError:
        return []


def _run_limited(cmd: list[str], limit_s: float, log_path: str, env: dict) -> tuple[int, bool]:
    """Run ``cmd`` with stdout+stderr to ``log_path``; end its process group at ``limit_s``.

    Returns ``(returncode, timed_out)``; a command that cannot start gives rc 127.
    """
    with open(log_path, "w") as log:
        try:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=env, start_new_session=True)
        except OSError as e:
            log.write(f"could not start {cmd[0]!r}: {e}\n")
            return 127, False
        try:
            return proc.wait(timeout=limit_s), False
        except subprocess.TimeoutExpired:
            _kill_group(proc, signal.SIGTERM)
            try:
                proc.wait(timeout=KILL_GRACE_S)
            except subprocess.TimeoutExpired:
                _kill_group(proc, signal.SIGKILL)
                proc.wait()
            log.write(f"\n[gpu_steps] ended after its {limit_s:.0f} s limit\n")
            return proc.returncode, True


def _kill_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # the step's own session: it and whatever it started
    except ProcessLookupError:
        pass


def _figures(csv_files, junit: str | None) -> dict:
    figs = {}
    for path in csv_files:
        if os.path.isfile(path):
            with open(path, newline="") as f:
                figs[os.path.basename(path)] = list(csv.DictReader(f))
        else:
            figs[os.path.basename(path)] = "not written"
    if junit:
        figs["junit"] = _junit_counts(junit)
    return figs


def _junit_counts(path: str) -> dict | str:
    """tests / failures / errors / skipped of a pytest JUnit XML file, plus the failed test ids."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return "not written"
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors", "skipped")}
    failed = []
    for case in root.iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            failed.append(f"{case.get('classname', '')}::{case.get('name', '')}")
    counts["failed"] = failed
    return counts


def _format_figures(val) -> list[str]:
    if isinstance(val, str):
        return [val]
    if isinstance(val, dict):
        return [", ".join(f"{k}={v}" for k, v in val.items())]
    if not val:
        return ["no rows"]
    keys = [k for k in ("suite", "provider", "median_s", "rate", "ratio", "tflops") if k in val[0]] or list(val[0])
    lines = ["  ".join(f"{k:>12}" if k != "provider" else f"{k:<38}" for k in keys)]
    for row in val:
        cells = []
        for k in keys:
            v = row.get(k, "")
            if k == "provider":
                cells.append(f"{v[:38]:<38}")
            else:
                try:
                    cells.append(f"{float(v):>12.4g}")
                except ValueError:
                    cells.append(f"{v[:12]:>12}")
        lines.append("  ".join(cells))
    return lines


def probe() -> dict:
    """Facts about this machine for the suite's skip rules (imports torch; never raises)."""
    import importlib
    import shutil

    facts = {"python": sys.version.split()[0]}
    try:
        import torch

        facts.update(torch=torch.__version__, torch_cuda=torch.version.cuda, gpu=torch.cuda.is_available())
        if facts["gpu"]:
            facts["gpu_name"] = torch.cuda.get_device_name()
            facts["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    except Exception as e:  # torch itself broken: every GPU step is skipped, the reason is in the log
        facts.update(torch=f"unusable: {type(e).__name__}: {e}", gpu=False)
    facts["nvcc"] = shutil.which("nvcc") is not None or any(
        os.path.isfile(os.path.join(os.environ.get(v, ""), "bin", "nvcc")) for v in ("CUDA_HOME", "CUDA_PATH")
        if os.environ.get(v))
    for mod in ("triton", "transformers", "peft", "pybind11", "faiss", "trak", "fast_jl"):
        try:
            facts[mod] = getattr(importlib.import_module(mod), "__version__", "present")
        except Exception as e:  # absent or broken: the steps that need it are skipped
            facts[mod] = False
            print(f"{mod}: absent ({type(e).__name__}: {e})")
    return facts


def _cli(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("init", help="start a results file")
    p.add_argument("results")
    p.add_argument("--budget", type=float, required=True, help="overall seconds for all steps")
    p.add_argument("--logs", help="folder of the step logs (default RESULTS/logs)")
    p.add_argument("--pack", action="store_true", help="keep RESULTS/logs.tar.gz of the logs up to date")
    p = sub.add_parser("step", help="run (or skip) one step and record it")
    p.add_argument("results")
    p.add_argument("name")
    p.add_argument("--timeout", type=float, required=True)
    p.add_argument("--needs", default="", help="comma-separated facts that must be true")
    p.add_argument("--if-failed", help="run only when this earlier step did not pass")
    p.add_argument("--csv", action="append", default=[], help="CSV file whose rows are the step's figures")
    p.add_argument("--junit", help="pytest JUnit XML whose counts are the step's figures")
    p.add_argument("--env", action="append", default=[], help="K=V set for the command")
    sub.add_parser("probe", help="print the facts line (imports torch)")
    p = sub.add_parser("finish", help="mark the results finished and print the closing table")
    p.add_argument("results")
    p = sub.add_parser("table", help="print the closing table")
    p.add_argument("results")
    argv = list(sys.argv[1:] if argv is None else argv)
    command = []
    if "--" in argv:  # everything after the first "--" is the step's command, untouched
        cut = argv.index("--")
        argv, command = argv[:cut], argv[cut + 1:]
    args = ap.parse_args(argv)

    if args.cmd == "init":
        Suite.init(args.results, args.budget, args.logs, args.pack)
    elif args.cmd == "step":
        if not command:
            ap.error("step needs a command after --")
        env = dict(kv.split("=", 1) for kv in args.env)
        rec = Suite(args.results).step(args.name, command, args.timeout, [n for n in args.needs.split(",") if n],
                                       args.if_failed, args.csv, args.junit, env)
        print(f"== {rec['name']}: {rec['status']} ({rec['seconds']:.1f} s)")
        for line in rec["tail"][-6:]:
            print("   | " + line)
    elif args.cmd == "probe":
        print(FACTS_PREFIX + json.dumps(probe()))
    elif args.cmd == "finish":
        suite = Suite(args.results)
        suite.finish()
        print(suite.table())
    else:
        print(Suite(args.results).table())
    return 0


if __name__ == "__main__":
    sys.exit(_cli())
