"""Triton's qa/L0_batcher checks not already in tests/test_scheduler.py, on the session's probe models
(tests/templates/probe_model.py: each response reports BATCH, the requests in its execute call, and STARTED)."""

from __future__ import annotations

import time

import numpy as np
import tritonclient.http as httpclient

from tests.test_scheduler import Concurrent


def rows(n: int, value: float):
    x = np.full((n, 1), value, np.float32)
    t = httpclient.InferInput("INPUT0", [n, 1], "FP32")
    t.set_data_from_numpy(x)
    return [t]


def test_batch_rows_not_requests_count_against_max_batch_size(server):
    """test_multi_batch_sum_gt_max_preferred: two requests of 3 rows (max_batch_size 4) run apart; each gets
    its own rows back."""
    c = Concurrent(server.http_url)
    c.send(0, "batch_max4", rows(3, 1.0))
    c.send(1, "batch_max4", rows(3, 2.0))
    results = c.wait()
    for key, value in ((0, 1.0), (1, 2.0)):
        assert int(results[key].as_numpy("BATCH")[0, 0]) == 1
        np.testing.assert_array_equal(results[key].as_numpy("OUTPUT0"), np.full((3, 1), value, np.float32))
    assert results[0].as_numpy("STARTED")[0, 0] != results[1].as_numpy("STARTED")[0, 0]


def test_a_full_batch_goes_without_waiting_the_delay(server):
    """test_multi_batch_sum_eq_max: 2 + 2 rows fill max_batch_size 4, so the batch leaves at once instead of
    waiting out the 1 s max_queue_delay."""
    c = Concurrent(server.http_url)
    started = time.monotonic()
    c.send(0, "batch_max4", rows(2, 1.0))
    c.send(1, "batch_max4", rows(2, 2.0))
    results = c.wait()
    assert time.monotonic() - started < 0.9
    assert [int(results[k].as_numpy("BATCH")[0, 0]) for k in (0, 1)] == [2, 2]
    np.testing.assert_array_equal(results[1].as_numpy("OUTPUT0"), np.full((2, 1), 2.0, np.float32))


def test_requests_asking_for_different_outputs_share_a_batch(server):
    """test_multi_different_output_order / test_multi_same_output: requests in one batch each get exactly the
    outputs they asked for."""
    c = Concurrent(server.http_url)
    c.send(0, "batch_max4", rows(2, 1.0), outputs=[httpclient.InferRequestedOutput("OUTPUT0")])
    c.send(1, "batch_max4", rows(2, 2.0), outputs=[httpclient.InferRequestedOutput("BATCH"),
                                                   httpclient.InferRequestedOutput("OUTPUT0")])
    results = c.wait()
    assert results[0].as_numpy("BATCH") is None and results[0].as_numpy("STARTED") is None
    np.testing.assert_array_equal(results[0].as_numpy("OUTPUT0"), np.full((2, 1), 1.0, np.float32))
    assert int(results[1].as_numpy("BATCH")[0, 0]) == 2  # batched with request 0
    np.testing.assert_array_equal(results[1].as_numpy("OUTPUT0"), np.full((2, 1), 2.0, np.float32))
