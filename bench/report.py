"""Output of a ``bench`` run: perf_analyzer-like summary on stdout, CSV, JSON and a latency/throughput plot."""

from __future__ import annotations

import csv
import json
import os
from typing import Any, TextIO

from bench.profiler import LevelResult, Report
from bench.stats import PERCENTILES, SERVER_PHASES

# perf_analyzer's column names where it has one; latencies and server times in microseconds.
SERVER_COLUMNS = {"queue": "Server Queue", "compute_input": "Server Compute Input",
                  "compute_infer": "Server Compute Infer", "compute_output": "Server Compute Output"}


def _level_name(result: LevelResult) -> str:
    return "Concurrency" if result.mode == "concurrency" else "Request Rate"


def summary_text(report: Report) -> str:
    """The human summary, laid out like perf_analyzer's."""
    o, s = report.options, report.settings
    lines = ["*** Measurement Settings ***", f"  Batch size: {o.batch_size}",
             f"  Protocol: {o.protocol}" + (f" ({o.url})" if o.protocol != "inprocess" else ""),
             f"  Shared memory: {o.shared_memory}",
             "  Using \"time_windows\" mode for stabilization",
             f"  Measurement window: {s.measurement_interval_ms} msec",
             f"  Stabilizing on {'p' + str(s.percentile) if s.percentile else 'average'} latency and throughput "
             f"within {s.stability_percentage:g}% over {s.stability_windows} windows (at most {s.max_trials})", ""]
    for r in report.levels:
        m = r.summary
        label = f"Request concurrency: {r.level:g}" if r.mode == "concurrency" else f"Request Rate: {r.level:g}"
        lines += [label, "  Client: ",
                  f"    Request count: {m.requests}",
                  f"    Throughput: {m.throughput:.2f} infer/sec"]
        if r.mode == "request_rate":
            lines.append(f"    Delayed requests: {m.delayed}")
        lines += [f"    p{p} latency: {m.latency_us[f'p{p}']:.0f} usec" for p in PERCENTILES]
        lines.append(f"    Avg latency: {m.latency_us['avg']:.0f} usec")
        if m.server:
            sv = m.server
            lines += ["  Server: ",
                      f"    Inference count: {sv['inference_count']}",
                      f"    Execution count: {sv['execution_count']}",
                      f"    Successful request count: {sv['success_count']}",
                      f"    Avg request latency: {sv['request_us']:.0f} usec (overhead {sv['overhead_us']:.0f} usec"
                      + "".join(f" + {p.replace('_', ' ')} {sv[p + '_us']:.0f} usec" for p in SERVER_PHASES) + ")"]
        if not r.stable:
            lines.append("  (not stable: the numbers are those of the last windows)")
        lines.append("")
    if report.levels:
        lines.append("Inferences/Second vs. Client p50 Latency")
        for r in report.levels:
            lines.append(f"{_level_name(r)}: {r.level:g}, throughput: {r.summary.throughput:.2f} infer/sec, "
                         f"latency {r.summary.latency_us['p50']:.0f} usec")
    return "\n".join(lines)


def csv_rows(report: Report) -> list[dict[str, Any]]:
    rows = []
    for r in report.levels:
        m = r.summary
        row: dict[str, Any] = {_level_name(r): f"{r.level:g}", "Inferences/Second": round(m.throughput, 3),
                               "Request Count": m.requests}
        for phase, column in SERVER_COLUMNS.items():
            row[column] = round(m.server[f"{phase}_us"], 1) if m.server else ""
        for p in PERCENTILES:
            row[f"p{p} latency"] = round(m.latency_us[f"p{p}"], 1)
        row["Avg latency"] = round(m.latency_us["avg"], 1)
        row["Delayed Requests"] = m.delayed
        row["Stable"] = int(r.stable)
        rows.append(row)
    return rows


def write_csv(report: Report, path: str) -> None:
    rows = csv_rows(report)
    fields: list[str] = []
    for row in rows:
        fields += [k for k in row if k not in fields]
    _ensure_dir(path)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def write_json(report: Report, path: str) -> None:
    _ensure_dir(path)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(report.to_dict(), f, indent=2)
        f.write("\n")


def write_plot(report: Report, path: str, title: str = "") -> None:
    """Latency (p50, p99) against throughput, one point per load level."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    o = report.options
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    x = [r.summary.throughput for r in report.levels]
    for key, style in (("p50", "o-"), ("p99", "s--")):
        ax.plot(x, [r.summary.latency_us[key] / 1000 for r in report.levels], style, label=f"{key} latency")
    for r in report.levels:
        tag = f"c={r.level:g}" if r.mode == "concurrency" else f"{r.level:g}/s"
        ax.annotate(tag, (r.summary.throughput, r.summary.latency_us["p50"] / 1000), textcoords="offset points",
                    xytext=(4, 4), fontsize=8)
    ax.set_xlabel("throughput (infer/sec)")
    ax.set_ylabel("latency (ms)")
    ax.set_title(title or f"{o.model} over {o.protocol} (batch {o.batch_size}, shm {o.shared_memory})")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    _ensure_dir(path)
    fig.savefig(path)
    plt.close(fig)


def _ensure_dir(path: str) -> None:
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)


def emit(report: Report, out: TextIO, csv_path: str | None = None, json_path: str | None = None,
         plot_path: str | None = None) -> None:
    print(summary_text(report), file=out)
    if csv_path:
        write_csv(report, csv_path)
    if json_path:
        write_json(report, json_path)
    if plot_path:
        write_plot(report, plot_path)
