"""Where a request's time goes, from trace files in Triton's format (ours and Triton's alike).

``python -m bench.timeline FILE [FILE ...]`` prints, per model and protocol, the median time of each
traced event after the request reached the server (HTTP_RECV_START, or GRPC_WAITREAD_END: Triton's
GRPC_WAITREAD_START is when its handler began waiting for *any* call; REQUEST_START for the in-process
API's requests). With ``--every`` (every request was traced: rate 1), "next request arrives" is when the
request after it reached the server: at concurrency 1, its distance from the send events is the client's
turnaround and its request's way to the server, which no trace event shows. An ensemble's steps (child
traces) appear as ``<step model>: <event>`` rows on their ensemble request's clock, which makes the
pipeline's hops visible. ``bench compare --trace N`` runs both servers with tracing and writes this
table for every scenario beside Triton's (timeline.md), splitting the traces by the scenario that
was running when they started.

Both servers stamp CLOCK_MONOTONIC nanoseconds (Triton's steady clock), so the windows of a run and
the stamps of both files are on one clock.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Iterable
from typing import Any

#: the next request's arrival (``--trace 1`` at concurrency 1): the client's turnaround, after the answer left
NEXT = "next request arrives"
#: events in the order a request meets them (the file's order differs between servers and runs)
ORDER = ["HTTP_RECV_START", "GRPC_WAITREAD_END", "HTTP_RECV_END", "REQUEST_START", "QUEUE_START", "COMPUTE_START",
         "COMPUTE_INPUT_END", "COMPUTE_OUTPUT_START", "COMPUTE_END", "INFER_RESPONSE_COMPLETE", "REQUEST_END",
         "HTTP_SEND_START", "GRPC_SEND_START", "HTTP_SEND_END", "GRPC_SEND_END", NEXT]
_RANK = {name: i for i, name in enumerate(ORDER)}


def load(paths: Iterable[str]) -> list[dict[str, Any]]:
    """Every trace of the files: ``{"id", "model", "parent", "ns": {event: ns}}`` (parents and children)."""
    traces: dict[tuple[str, int], dict[str, Any]] = {}
    for path in paths:
        with open(path, encoding="utf-8", errors="replace") as f:
            records = json.load(f)
        for r in records:
            t = traces.setdefault((path, r["id"]), {"id": r["id"], "model": "", "parent": 0, "ns": {}, "file": path})
            if "model_name" in r:
                t["model"] = r["model_name"]
                t["parent"] = r.get("parent_id", 0)
            elif "timestamps" in r:
                for stamp in r["timestamps"]:
                    t["ns"][stamp["name"]] = stamp["ns"]
    return list(traces.values())


def _base(ns: dict[str, int]) -> int | None:
    """When the request reached the server: its first protocol event, or REQUEST_START in process."""
    return ns.get("HTTP_RECV_START", ns.get("GRPC_WAITREAD_END", ns.get("REQUEST_START")))


def offsets(traces: list[dict[str, Any]], window: tuple[int, int] | None = None,
            every: bool = False) -> dict[str, dict[str, list[int]]]:
    """Per ``"<model> <protocol>"`` of the requests clients made (in ``window``, by REQUEST_START): each
    event's offsets after the request reached the server, its steps' events as ``"<model>: <event>"``;
    ``every`` (each request was traced): also when the next request arrived."""
    children: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for t in traces:
        if t["parent"]:
            children.setdefault((t["file"], t["parent"]), []).append(t)
    out: dict[str, dict[str, list[int]]] = {}
    following: dict[int, int] = {}  # id(trace) -> when the request after it arrived
    if every:  # (one server's traces, whatever their files; ids rise with each traced request, whatever the
        # rate: only the caller knows that it was 1)
        roots = sorted((t["id"], base, id(t)) for t in traces if not t["parent"] and (base := _base(t["ns"])))
        for (_, _, key), (_, after, _) in zip(roots, roots[1:]):
            following[key] = after
    for t in traces:
        ns = t["ns"]
        base = _base(ns)
        if t["parent"] or base is None:
            continue
        if id(t) in following:
            ns = {**ns, NEXT: following[id(t)]}
        if window is not None and not window[0] <= ns.get("REQUEST_START", base) <= window[1]:
            continue
        protocol = "gRPC" if "GRPC_WAITREAD_END" in ns else "HTTP" if "HTTP_RECV_START" in ns else "in process"
        events = out.setdefault(f"{t['model']} {protocol}", {})
        for name, at in ns.items():
            if name in _RANK and name not in ("HTTP_RECV_START", "GRPC_WAITREAD_END"):
                events.setdefault(name, []).append(at - base)
        for child in _descendants(children, t):
            for name, at in child["ns"].items():
                events.setdefault(f"{child['model']}: {name}", []).append(at - base)
    return out


def _descendants(children: dict, trace: dict) -> list[dict]:
    found = []
    for child in children.get((trace["file"], trace["id"]), []):
        found.append(child)
        found.extend(_descendants(children, child))
    return found


def table(sides: dict[str, dict[str, list[int]]]) -> str:
    """A markdown table: one row per event, one column per side (median µs after arrival; n traced)."""
    names = sorted({name for events in sides.values() for name in events}, key=_key(sides))
    head = "| event | " + " | ".join(f"{side} (µs)" for side in sides) + " |"
    lines = [head, "| --- |" + " ---: |" * len(sides)]
    for name in names:
        cells = []
        for events in sides.values():
            values = events.get(name)
            cells.append(f"{statistics.median(values) / 1000:,.0f}" if values else "—")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    counts = [str(max((len(v) for v in events.values()), default=0)) for events in sides.values()]
    lines.append("| requests traced | " + " | ".join(counts) + " |")
    return "\n".join(lines)


def _key(sides: dict[str, dict[str, list[int]]]) -> Any:
    """Rows by when they happen on the first side that has them (its own order reads top to bottom)."""
    def key(name: str) -> tuple[int, float, int]:
        for i, events in enumerate(sides.values()):
            if events.get(name):
                return (i, statistics.median(events[name]), _RANK.get(name.split(": ")[-1], 0))
        return (len(sides), 0.0, 0)
    return key


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.timeline", description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", help="trace files (Triton's format), one column each")
    parser.add_argument("--every", action="store_true", help="every request was traced (rate 1): add when the "
                                                             "next request arrived")
    args = parser.parse_args(argv)
    per_file = {path: offsets(load([path]), every=args.every) for path in args.files}
    groups = sorted({group for result in per_file.values() for group in result})
    for group in groups:
        print(f"\n### {group}\n")
        print(table({path: result.get(group, {}) for path, result in per_file.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
