"""bench soak, briefly: mixed load, two workers killed, nothing left behind."""

from __future__ import annotations

import json

from bench.soak import main


def test_short_soak_reports_loads_kills_and_leaves_nothing(tmp_path, capsys):
    path = tmp_path / "soak.json"
    code = main(["--duration", "14", "--warmup", "3", "--kill-every", "5", "--sample-every", "3",
                 "--json", str(path)])
    out = capsys.readouterr().out
    report = json.loads(path.read_text())
    assert code == 0, out
    assert report["server_exit_code"] == 0
    assert set(report["loads"]) == {"http binary (add_sub)", "http json (identity, upper)", "grpc (add_sub)",
                                    "shared memory (add_sub)", "grpc streaming (repeat, decoupled)",
                                    "grpc ensemble (soak_pipeline: add_sub twice)"}
    assert all(t["ok"] > 0 and t["errors"] == 0 for t in report["loads"].values()), out
    assert len(report["kills"]) >= 1 and report["longest_time_to_ready_s"] < 2.0, out
    assert report["shm_left_after_exit"] == []
    assert "front" in report["last"]["roles"] and report["samples"]
    assert "workers killed:" in out
