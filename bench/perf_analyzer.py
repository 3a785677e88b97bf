"""Drive NVIDIA's ``perf_analyzer`` (PyPI ``perf_analyzer==2.60.0``) and read its CSV report.

The binary needs glibc >= 2.38 (Ubuntu 24.04); elsewhere ``find_binary`` still finds it but it will
not start, and ``run`` reports perf_analyzer's own error. Columns of ``-f FILE --verbose-csv``
(perf_analyzer's report_writer.cc), latencies and server times in microseconds:
``Concurrency`` (or ``Request Rate``), ``Inferences/Second``, ``Client Send``,
``Network+Server Send/Recv``, ``Server Queue``, ``Server Compute Input``, ``Server Compute Infer``,
``Server Compute Output``, ``Client Recv``, ``p50 latency``, ``p90 latency``, ``p95 latency``,
``p99 latency``, ``Avg latency`` (left out with ``--percentile``), ``request/response``, ``response wait``.
perf_analyzer writes no report for a load level that did not stabilize; with ``-v`` it prints every
window (``Pass [n] throughput: X infer/sec. p50 latency: Y usec``), from which ``run`` then takes the
last windows' numbers, flagged unstable.
"""

from __future__ import annotations

import csv
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from typing import Any

from bench.inputs import BenchError
from bench.process import run_child

UNSTABLE_TEXT = "Failed to obtain stable measurement"
PASS_LINE = re.compile(r"Pass \[(\d+)\] throughput: ([0-9.eE+-]+) infer/sec\. (p(\d+)|Avg) latency: (\d+) usec")
SERVER_COLUMNS = {"queue_us": "Server Queue", "compute_input_us": "Server Compute Input",
                  "compute_infer_us": "Server Compute Infer", "compute_output_us": "Server Compute Output",
                  "network_us": "Network+Server Send/Recv"}
CLIENT_COLUMNS = {"p50": "p50 latency", "p90": "p90 latency", "p95": "p95 latency", "p99": "p99 latency",
                  "avg": "Avg latency"}


def find_binary(explicit: str | None = None) -> str:
    """The perf_analyzer executable: ``explicit``, $PERF_ANALYZER, the ``perf_analyzer`` wheel's
    ``bin/perf_analyzer``, or ``perf_analyzer`` on PATH."""
    candidates = [explicit or "", os.environ.get("PERF_ANALYZER", "")]
    try:
        import perf_analyzer

        candidates.append(os.path.join(os.path.dirname(perf_analyzer.__file__), "bin", "perf_analyzer"))
    except ImportError:
        pass
    candidates.append(shutil.which("perf_analyzer") or "")
    for path in candidates:
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    if explicit:
        raise BenchError(f"perf_analyzer binary {explicit} is not an executable file")
    raise BenchError("perf_analyzer not found: pip install perf_analyzer==2.60.0 (needs glibc >= 2.38), "
                     "or give --perf-analyzer PATH / $PERF_ANALYZER")


def version(binary: str) -> str:
    """The perf_analyzer wheel's version when ``binary`` is its executable, else what ``--version`` prints."""
    try:
        import perf_analyzer

        package_bin = os.path.join(os.path.dirname(perf_analyzer.__file__), "bin", "perf_analyzer")
        if os.path.exists(package_bin) and os.path.samefile(package_bin, binary):
            from importlib.metadata import version as dist_version

            return dist_version("perf_analyzer")
    except (ImportError, OSError, ValueError):
        pass
    try:
        out = run_child([binary, "--version"], 30)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    first = (out.stdout or out.stderr).strip().splitlines()
    return f"at {binary} ({first[0] if first else 'version unknown'})"


@dataclass
class PerfAnalyzerRun:
    """One perf_analyzer invocation: model, server and load."""

    model: str
    url: str
    protocol: str = "http"  # http | grpc
    concurrency: int | None = 1
    request_rate: float | None = None
    batch_size: int = 1
    shapes: list[str] = field(default_factory=list)  # NAME:d1,d2 as perf_analyzer takes them
    shared_memory: str = "none"  # none | system
    output_shm_size: int = 102400
    measurement_interval_ms: int = 5000
    max_trials: int = 10
    stability_percentage: float = 10.0
    stability_windows: int = 3  # perf_analyzer's fixed stability window count, for reading its passes
    percentile: int | None = 50  # latency perf_analyzer stabilizes on (None: its default, the average)
    input_data: str = "random"
    extra: list[str] = field(default_factory=list)

    def command(self, binary: str, csv_path: str) -> list[str]:
        cmd = [binary, "-m", self.model, "-u", self.url, "-i", self.protocol, "-b", str(self.batch_size),
               "--measurement-interval", str(self.measurement_interval_ms), "--max-trials", str(self.max_trials),
               "--stability-percentage", f"{self.stability_percentage:g}", "--input-data", self.input_data,
               "-f", csv_path, "--verbose-csv", "-v"]
        if self.percentile:
            cmd.append(f"--percentile={self.percentile}")
        if self.request_rate:
            cmd += ["--request-rate-range", f"{self.request_rate:g}"]
        else:
            cmd += ["--concurrency-range", str(self.concurrency or 1)]
        for shape in self.shapes:
            cmd += ["--shape", shape]
        if self.shared_memory != "none":
            cmd += ["--shared-memory", self.shared_memory, "--output-shared-memory-size", str(self.output_shm_size)]
        return cmd + list(self.extra)

    def timeout_s(self) -> float:
        return self.max_trials * self.measurement_interval_ms / 1000 * 1.5 + 60


def _number(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text


def parse_csv(text: str) -> list[dict[str, Any]]:
    """Rows of perf_analyzer's CSV report, numbers as floats."""
    lines = [line for line in text.splitlines() if line.strip()]
    return [{k.strip(): _number(v.strip()) for k, v in row.items() if k} for row in csv.DictReader(lines)]


def normalize(row: dict[str, Any]) -> dict[str, Any]:
    """A perf_analyzer CSV row in the shape of bench's summary (``throughput``, ``latency_us``, ``server``)."""
    if "Inferences/Second" not in row or "p50 latency" not in row:
        raise BenchError(f"unexpected perf_analyzer CSV columns: {', '.join(row)}")
    latency = {key: float(row[col]) for key, col in CLIENT_COLUMNS.items() if col in row}
    server = {key: float(row[col]) for key, col in SERVER_COLUMNS.items() if col in row}
    mode = "concurrency" if "Concurrency" in row else "request_rate"
    level = row.get("Concurrency", row.get("Request Rate", 0))
    return {"mode": mode, "level": level, "throughput": float(row["Inferences/Second"]), "latency_us": latency,
            "server": server or None, "raw": row}


def parse_passes(output: str) -> list[dict[str, Any]]:
    """The per-window lines of ``perf_analyzer -v`` for the last load level in ``output``."""
    passes: list[dict[str, Any]] = []
    for match in PASS_LINE.finditer(output):
        if match.group(1) == "1":
            passes = []
        key = f"p{match.group(4)}" if match.group(4) else "avg"
        passes.append({"throughput": float(match.group(2)), key: float(match.group(5))})
    return passes


def from_passes(passes: list[dict[str, Any]], count: int) -> dict[str, Any]:
    """Numbers of an unstable run: mean throughput and median latency of its last ``count`` windows."""
    last = passes[-count:]
    latency_key = next(k for k in last[-1] if k != "throughput")
    latencies = sorted(p[latency_key] for p in last)
    return {"mode": "concurrency", "level": None, "throughput": sum(p["throughput"] for p in last) / len(last),
            "latency_us": {latency_key: latencies[len(latencies) // 2]}, "server": None,
            "raw": {"passes": passes}}


def run(spec: PerfAnalyzerRun, binary: str | None = None, log_path: str | None = None) -> dict[str, Any]:
    """Run perf_analyzer once; return the normalized row plus ``stable``, ``command`` and ``output``."""
    exe = find_binary(binary)
    with tempfile.TemporaryDirectory(prefix="bench-pa-") as tmp:
        csv_path = os.path.join(tmp, "pa.csv")
        cmd = spec.command(exe, csv_path)
        try:
            proc = run_child(cmd, spec.timeout_s(), cwd=tmp)
        except subprocess.TimeoutExpired as e:
            raise BenchError(f"perf_analyzer did not finish in {spec.timeout_s():.0f} s: {' '.join(cmd)}") from e
        except OSError as e:
            raise BenchError(f"cannot run {exe}: {e}") from e
        output = proc.stdout + proc.stderr
        if log_path:
            with open(log_path, "a", encoding="utf-8") as f:
                f.write(f"$ {' '.join(cmd)}\n{output}\n(rc={proc.returncode})\n\n")
        text = ""
        if os.path.exists(csv_path):
            with open(csv_path, encoding="utf-8") as f:
                text = f.read()
    rows = parse_csv(text) if text else []
    passes = parse_passes(output)
    if rows:
        result = normalize(rows[-1])
    elif UNSTABLE_TEXT in output and passes:
        result = from_passes(passes, spec.stability_windows)
        result.update(mode="request_rate" if spec.request_rate else "concurrency",
                      level=spec.request_rate or spec.concurrency)
    else:
        tail = "\n".join(output.strip().splitlines()[-15:])
        raise BenchError(f"perf_analyzer failed (rc={proc.returncode}): {' '.join(cmd)}\n{tail}")
    result.update(stable=UNSTABLE_TEXT not in output, command=cmd, returncode=proc.returncode, csv=text,
                  passes=passes)
    return result
