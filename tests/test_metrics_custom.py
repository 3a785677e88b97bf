"""Triton's python-backend custom metrics (``pb_utils.MetricFamily``), after qa/L0_backend_python/custom_metrics
and what Triton 2.51 was seen doing (docs/triton-behaviour.md §12a): models create families and metrics, and their
series appear on the server's /metrics, read here with a plain HTTP GET while tritonclient drives the models.
Checked: counter, gauge and histogram values and their text, labels, families and series shared by name and labels
(two instances, two models), Triton's error messages, a family deleted by its model, families registered for good
and shown only with series, families of the server's own names, and series that outlive an unloaded model."""

from __future__ import annotations

import json
import re
import textwrap
import threading
import time
import urllib.request

import numpy as np
import pytest
import tritonclient.http as httpclient

from tests.support import python_model, serving

_IO = ('input [ { name: "CMD", data_type: TYPE_STRING, dims: [ 1 ] } ]\n'
       'output [ { name: "OUT", data_type: TYPE_STRING, dims: [ 1 ] } ]\n')

#: Runs the commands of its request (a JSON list) on the metrics it keeps, and answers their results (JSON):
#: None, a value, or {"error": message} for a pb_utils.TritonModelException.
_API = textwrap.dedent('''
    import json
    import threading
    import time

    import numpy as np
    import triton_python_backend_utils as pb_utils

    KINDS = {"COUNTER": pb_utils.MetricFamily.COUNTER, "GAUGE": pb_utils.MetricFamily.GAUGE,
             "HISTOGRAM": pb_utils.MetricFamily.HISTOGRAM}


    class TritonPythonModel:
        def initialize(self, args):
            self.families = {}
            self.metrics = {}

        def run(self, cmd):
            do = cmd["do"]
            if do == "family":
                self.families[cmd["key"]] = pb_utils.MetricFamily(
                    name=cmd["name"], description=cmd.get("description", "a test family"), kind=KINDS[cmd["kind"]])
            elif do == "metric":
                arguments = {k: cmd[k] for k in ("labels", "buckets") if k in cmd}
                self.metrics[cmd["key"]] = self.families[cmd["family"]].Metric(**arguments)
            elif do == "drop_family":
                del self.families[cmd["key"]]
            elif do == "drop_metric":
                del self.metrics[cmd["key"]]
            elif do in ("increment", "set", "observe"):
                for value in cmd["values"]:
                    getattr(self.metrics[cmd["key"]], do)(value)
            elif do == "value":
                return self.metrics[cmd["key"]].value()
            elif do == "later":  # from a thread of the model's own, after execute has answered
                metric = self.metrics[cmd["key"]]
                threading.Thread(target=lambda: (time.sleep(0.2), metric.increment(cmd["value"]))).start()
            return None

        def execute(self, requests):
            responses = []
            for request in requests:
                results = []
                for cmd in json.loads(pb_utils.get_input_tensor_by_name(request, "CMD").as_numpy()[0]):
                    try:
                        results.append(self.run(cmd))
                    except pb_utils.TritonModelException as e:
                        results.append({"error": str(e)})
                out = np.array([json.dumps(results).encode()], np.object_)
                responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUT", out)]))
            return responses
''')

#: Every instance counts 1 into ``ek_requests{source="<SOURCE>"}`` when it starts, and 1 per request; a request
#: answers the instance's name and the series' value.
_SHARED = textwrap.dedent('''
    import json
    import time

    import numpy as np
    import triton_python_backend_utils as pb_utils

    SOURCE = "shared"


    class TritonPythonModel:
        def initialize(self, args):
            self.name = args["model_instance_name"]
            self.family = pb_utils.MetricFamily(name="ek_requests", description="requests seen",
                                                kind=pb_utils.MetricFamily.COUNTER)
            self.shared = self.family.Metric(labels={"source": "shared"})
            self.own = self.family.Metric(labels={"source": SOURCE})
            self.shared.increment(1)
            self.gauge_family = pb_utils.MetricFamily(name="ek_loaded_" + SOURCE, description="loaded",
                                                      kind=pb_utils.MetricFamily.GAUGE)
            self.gauge_family.Metric().set(1)

        def finalize(self):
            del self.gauge_family  # its series goes; ek_requests' stay (never deleted)

        def execute(self, requests):
            responses = []
            for request in requests:
                time.sleep(0.1)
                self.shared.increment(1)
                info = {"instance": self.name, "value": self.shared.value()}
                out = np.array([json.dumps(info).encode()], np.object_)
                responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUT", out)]))
            return responses
''')


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    repo = tmp_path_factory.mktemp("metrics_custom")
    python_model(repo, "metrics_api", _API, _IO)
    python_model(repo, "metrics_shared", _SHARED, _IO + "instance_group [ { kind: KIND_CPU, count: 2 } ]\n")
    python_model(repo, "metrics_other", _SHARED.replace('SOURCE = "shared"', 'SOURCE = "other"'), _IO)
    yield from serving(repo, tmp_path_factory.mktemp("metrics_custom_log"), "--model-control-mode", "explicit",
                       "--load-model", "metrics_api")


@pytest.fixture
def http(server):
    client = httpclient.InferenceServerClient(server.http_url)
    yield client
    client.close()


def scrape(server) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10) as r:
        return r.read().decode()


def samples(text: str, family: str) -> dict[str, str]:
    """The sample lines of ``family`` (and its _count/_sum/_bucket lines): name{labels} -> value."""
    found = {}
    for line in text.splitlines():
        m = re.match(rf"^({family}(?:_count|_sum|_bucket)?(?:\{{[^}}]*\}})?) (\S+)$", line)
        if m:
            found[m.group(1)] = m.group(2)
    return found


def run(http, model: str, *commands: dict) -> list:
    t = httpclient.InferInput("CMD", [1], "BYTES")
    t.set_data_from_numpy(np.array([json.dumps(list(commands)).encode()], np.object_))
    return json.loads(http.infer(model, [t]).as_numpy("OUT")[0])


def test_counter_gauge_and_histogram_values_and_their_text(server, http):
    counter = {"example1": "counter_label1", "example2": "counter_label2"}
    assert run(http, "metrics_api",
               {"do": "family", "key": "c", "name": "ek_counter_e2e", "kind": "COUNTER", "description": "a counter"},
               {"do": "metric", "key": "c", "family": "c", "labels": counter},
               {"do": "value", "key": "c"},
               {"do": "increment", "key": "c", "values": [2023.0]},
               {"do": "value", "key": "c"},
               {"do": "family", "key": "g", "name": "ek_gauge_e2e", "kind": "GAUGE"},
               {"do": "metric", "key": "g", "family": "g", "labels": {"example1": "gauge_label1"}},
               {"do": "increment", "key": "g", "values": [2023.0, -23.5]},
               {"do": "value", "key": "g"},
               {"do": "set", "key": "g", "values": [999.9]},
               {"do": "value", "key": "g"},
               {"do": "family", "key": "h", "name": "ek_histogram_e2e", "kind": "HISTOGRAM"},
               {"do": "metric", "key": "h", "family": "h", "labels": {"example1": "histogram_label1"},
                "buckets": [0.1, 1.0, 2.5, 5.0, 10.0]}) == [
        None, None, 0.0, None, 2023.0, None, None, None, 1999.5, None, 999.9, None, None]
    text = scrape(server)
    assert "# HELP ek_counter_e2e a counter\n# TYPE ek_counter_e2e counter\n" \
           'ek_counter_e2e{example1="counter_label1",example2="counter_label2"} 2023\n' in text
    assert "# TYPE ek_gauge_e2e gauge\n" in text
    assert samples(text, "ek_gauge_e2e") == {'ek_gauge_e2e{example1="gauge_label1"}': "999.9"}
    labels = 'example1="histogram_label1"'
    zero = {f"ek_histogram_e2e_bucket{{{labels},le=\"{le}\"}}": "0" for le in ("0.1", "1", "2.5", "5", "10", "+Inf")}
    zero.update({f"ek_histogram_e2e_count{{{labels}}}": "0", f"ek_histogram_e2e_sum{{{labels}}}": "0"})
    assert "# TYPE ek_histogram_e2e histogram\n" in text
    assert samples(text, "ek_histogram_e2e") == zero

    assert run(http, "metrics_api", {"do": "observe", "key": "h", "values": [0.05, 1.5, 6.0]}) == [None]
    text = scrape(server)
    counts = dict(zip(("0.1", "1", "2.5", "5", "10", "+Inf"), ("1", "1", "2", "2", "3", "3")))
    expected = {f"ek_histogram_e2e_bucket{{{labels},le=\"{le}\"}}": n for le, n in counts.items()}
    expected.update({f"ek_histogram_e2e_count{{{labels}}}": "3", f"ek_histogram_e2e_sum{{{labels}}}": "7.55"})
    assert samples(text, "ek_histogram_e2e") == expected
    # Triton's order: count, sum, then the buckets in increasing order
    lines = [line for line in text.splitlines() if line.startswith("ek_histogram_e2e")]
    assert lines[0].startswith("ek_histogram_e2e_count") and lines[1].startswith("ek_histogram_e2e_sum")
    assert lines[-1] == f'ek_histogram_e2e_bucket{{{labels},le="+Inf"}} 3'
    assert "nv_inference_count" in text  # the server's own metrics are still there


#: how Triton's python backend words the refusals of its registry (observed on 2.51), naming the instance (a
#: config without instance_group has one group named after the model)
_REFUSED = "Failed to process the request for model 'metrics_api_0', message: "
_CLEARED = ("Invalid metric operation as the corresponding 'MetricFamily' has been deleted. The 'MetricFamily' "
            "object should be deleted AFTER its corresponding 'Metric' objects have been deleted.")


def test_wrong_operations_raise_tritons_errors_and_change_nothing(server, http):
    results = run(
        http, "metrics_api",
        {"do": "family", "key": "ec", "name": "ek_errors_counter", "kind": "COUNTER"},
        {"do": "metric", "key": "ec", "family": "ec"},
        {"do": "family", "key": "eg", "name": "ek_errors_gauge", "kind": "GAUGE"},
        {"do": "metric", "key": "eg", "family": "eg"},
        {"do": "family", "key": "eh", "name": "ek_errors_histogram", "kind": "HISTOGRAM"},
        {"do": "metric", "key": "eh", "family": "eh", "buckets": [1.0]},
        {"do": "increment", "key": "ec", "values": [5, -1]},
        {"do": "set", "key": "ec", "values": [1]},
        {"do": "observe", "key": "ec", "values": [1]},
        {"do": "observe", "key": "eg", "values": [1]},
        {"do": "increment", "key": "eh", "values": [1]},
        {"do": "set", "key": "eh", "values": [1]},
        {"do": "value", "key": "eh"},
        {"do": "metric", "key": "x", "family": "eh"},
        {"do": "metric", "key": "x", "family": "eh", "buckets": None},
        {"do": "metric", "key": "x", "family": "ec", "buckets": [1.0]},
        {"do": "metric", "key": "x", "family": "eh", "buckets": [2.5, 0.1, 1.0]},
        {"do": "metric", "key": "x", "family": "eh", "buckets": [1, 1, 2]},
        {"do": "metric", "key": "x", "family": "eh", "buckets": "1,2"},
        {"do": "metric", "key": "x", "family": "ec", "labels": ["a", "b"]},
        {"do": "metric", "key": "x", "family": "ec", "labels": {"a": 1}},
        {"do": "metric", "key": "x", "family": "ec", "labels": {"1a": "b"}},
        {"do": "metric", "key": "x", "family": "eh", "labels": {"le": "b"}, "buckets": [1.0]},
        {"do": "family", "key": "x", "name": "ek-bad-name", "kind": "COUNTER"},
        {"do": "family", "key": "x", "name": "ek_errors_counter", "kind": "GAUGE"},
        {"do": "family", "key": "x", "name": "nv_inference_count", "kind": "GAUGE"},  # Triton's is a counter
        {"do": "metric", "key": "empty", "family": "eh", "buckets": []},
        {"do": "value", "key": "ec"},
    )
    assert results[:6] == [None] * 6
    assert results[6:] == [
        {"error": "Failed to increment metric value: TRITONSERVER_METRIC_KIND_COUNTER can only be incremented "
                  "monotonically by non-negative values."},
        {"error": "Failed to set metric value: TRITONSERVER_METRIC_KIND_COUNTER does not support Set"},
        {"error": "Failed to observe metric value: TRITONSERVER_METRIC_KIND_COUNTER does not support Observe"},
        {"error": "Failed to observe metric value: TRITONSERVER_METRIC_KIND_GAUGE does not support Observe"},
        {"error": "Failed to increment metric value: TRITONSERVER_METRIC_KIND_HISTOGRAM does not support Increment"},
        {"error": "Failed to set metric value: TRITONSERVER_METRIC_KIND_HISTOGRAM does not support Set"},
        {"error": "Failed to get metric value: TRITONSERVER_METRIC_KIND_HISTOGRAM does not support Value"},
        {"error": "Failed to create metric. Missing required buckets."},
        {"error": "Failed to create metric. Missing required buckets."},
        {"error": "Failed to create metric. Unexpected buckets found."},
        {"error": "Error when creating Metric: Bucket Boundaries must be strictly sorted"},
        {"error": "Error when creating Metric: Bucket Boundaries must be strictly sorted"},
        {"error": "Failed to create metric. Buckets must be a list."},
        {"error": "Failed to create metric. Labels must be a dictionary."},
        {"error": "Error when creating Metric: attempt to access JSON non-string as string"},
        {"error": "Error when creating Metric: Invalid label name"},
        {"error": "Error when creating Metric: Invalid label name"},
        {"error": f"Error when creating MetricFamily: {_REFUSED}Invalid metric name"},
        {"error": f"Error when creating MetricFamily: {_REFUSED}Family name already exists with different type"},
        {"error": f"Error when creating MetricFamily: {_REFUSED}Family name already exists with different type"},
        None,  # an empty bucket list is allowed: the +Inf bucket alone
        5.0,  # the increment before the refused one counted, the refused one did not
    ]
    text = scrape(server)
    assert samples(text, "ek_errors_counter") == {"ek_errors_counter": "5"}
    assert samples(text, "ek_errors_gauge") == {"ek_errors_gauge": "0"}
    assert samples(text, "ek_errors_histogram") == {"ek_errors_histogram_count": "0", "ek_errors_histogram_sum": "0",
                                                    'ek_errors_histogram_bucket{le="1"}': "0",
                                                    'ek_errors_histogram_bucket{le="+Inf"}': "0"}
    assert text.count("# TYPE ek_errors_counter counter") == 1 and "ek-bad-name" not in text
    assert text.count("# TYPE nv_inference_count ") == 1


def test_same_name_is_one_family_and_same_labels_one_series(server, http):
    """Two MetricFamily objects of one name share the family (the first description stays); Metric objects
    with equal labels, from either, count into one series (Triton's test_dup_metric_* cases)."""
    assert run(http, "metrics_api",
               {"do": "family", "key": "d1", "name": "ek_dup", "kind": "COUNTER", "description": "first description"},
               {"do": "family", "key": "d2", "name": "ek_dup", "kind": "COUNTER", "description": "second description"},
               {"do": "metric", "key": "d1a", "family": "d1", "labels": {"k": "a", "j": "x"}},
               {"do": "metric", "key": "d2a", "family": "d2", "labels": {"j": "x", "k": "a"}},
               {"do": "metric", "key": "d1b", "family": "d1", "labels": {"k": "b"}},
               {"do": "metric", "key": "d1e", "family": "d1"},
               {"do": "increment", "key": "d1a", "values": [2]},
               {"do": "increment", "key": "d2a", "values": [3.5]},
               {"do": "value", "key": "d1a"},
               {"do": "value", "key": "d2a"},
               {"do": "drop_family", "key": "d1"},  # d2 still holds the family, and a series of it
               ) == [None] * 8 + [5.5, 5.5, None]
    text = scrape(server)
    assert "# HELP ek_dup first description\n# TYPE ek_dup counter\n" in text and "second description" not in text
    # the series only d1's Metric objects held went with d1; the one d2 holds too stays
    assert samples(text, "ek_dup") == {'ek_dup{j="x",k="a"}': "5.5"}
    assert run(http, "metrics_api", {"do": "increment", "key": "d1b", "values": [1]},
               {"do": "increment", "key": "d2a", "values": [1]}) == [{"error": f"Failed to increment metric value: "
                                                                               f"{_CLEARED}"}, None]
    assert run(http, "metrics_api", {"do": "drop_family", "key": "d2"}, {"do": "value", "key": "d2a"}) == [
        None, {"error": f"Failed to get metric value: {_CLEARED}"}]
    text = scrape(server)
    assert "ek_dup" not in text  # no series: nothing shown (the family stays registered)


def test_operations_are_on_metrics_when_the_response_arrives(server, http):
    """increment() does not wait for the server, yet a client that has its response sees its effect: the
    operations go ahead of the answer. Those of a model's own thread arrive once the worker idles."""
    run(http, "metrics_api", {"do": "family", "key": "o", "name": "ek_ordered", "kind": "COUNTER"},
        {"do": "metric", "key": "o", "family": "o"})
    for i in range(1, 21):
        run(http, "metrics_api", {"do": "increment", "key": "o", "values": [1]})
        assert samples(scrape(server), "ek_ordered") == {"ek_ordered": str(i)}
    run(http, "metrics_api", {"do": "later", "key": "o", "value": 100})
    deadline = time.monotonic() + 5
    while samples(scrape(server), "ek_ordered") != {"ek_ordered": "120"}:
        assert time.monotonic() < deadline, scrape(server)
        time.sleep(0.1)


def test_instances_and_models_share_series_and_unloaded_models_leave_theirs(server, http):
    """As Triton 2.51: a worker that stops never deletes the MetricFamily objects it holds, so their series stay
    with their values (a model loaded again counts on), while a family its finalize deletes goes."""
    run(http, "metrics_api", {"do": "family", "key": "b", "name": "ek_bystander", "kind": "GAUGE"},
        {"do": "metric", "key": "b", "family": "b", "labels": {"source": "shared"}},
        {"do": "set", "key": "b", "values": [7]})
    http.load_model("metrics_shared")
    try:
        text = scrape(server)
        assert samples(text, "ek_requests") == {'ek_requests{source="shared"}': "2"}  # each instance's initialize
        answers: list[dict] = []

        def infer() -> None:
            client = httpclient.InferenceServerClient(server.http_url)
            answers.extend(run(client, "metrics_shared", {}) for _ in range(3))
            client.close()

        threads = [threading.Thread(target=infer) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len({a["instance"] for a in answers}) == 2, answers  # both instances counted
        assert samples(scrape(server), "ek_requests") == {'ek_requests{source="shared"}': "14"}
        assert run(http, "metrics_shared", {})["value"] == 15  # value(): the series of both instances

        http.load_model("metrics_other")  # another model: same family, one series shared, one of its own
        assert samples(scrape(server), "ek_requests") == {'ek_requests{source="shared"}': "16",
                                                          'ek_requests{source="other"}': "0"}
        assert samples(scrape(server), "ek_loaded_other") == {"ek_loaded_other": "1"}
        http.unload_model("metrics_other")
        text = scrape(server)
        assert samples(text, "ek_requests") == {'ek_requests{source="shared"}': "16",
                                                'ek_requests{source="other"}': "0"}  # never deleted: they stay
        assert "ek_loaded_other" not in text  # deleted by its finalize
    finally:
        http.unload_model("metrics_shared")
    text = scrape(server)
    assert samples(text, "ek_requests") == {'ek_requests{source="shared"}': "16", 'ek_requests{source="other"}': "0"}
    assert "ek_loaded_shared" not in text
    assert samples(text, "ek_bystander") == {'ek_bystander{source="shared"}': "7"}  # another model's: untouched

    http.load_model("metrics_shared")  # loaded again: its instances count on from the series left behind
    try:
        assert samples(scrape(server), "ek_requests") == {'ek_requests{source="shared"}': "18",
                                                          'ek_requests{source="other"}': "0"}
        assert samples(scrape(server), "ek_loaded_shared") == {"ek_loaded_shared": "1"}
    finally:
        http.unload_model("metrics_shared")


def test_a_family_shows_only_with_series_and_stays_registered(server, http):
    """prometheus-cpp prints no family without series (not even ``# TYPE``), and its registry keeps a family for
    the server's lifetime: once every object of it is gone, another kind is still refused and the first
    description still shown (Triton 2.51)."""
    assert run(http, "metrics_api",
               {"do": "family", "key": "e", "name": "ek_registered", "kind": "GAUGE", "description": "first"}) == [None]
    assert "ek_registered" not in scrape(server)  # an object, no series
    run(http, "metrics_api", {"do": "metric", "key": "e", "family": "e", "labels": {"k": "v"}},
        {"do": "set", "key": "e", "values": [3]})
    assert '# HELP ek_registered first\n# TYPE ek_registered gauge\nek_registered{k="v"} 3\n' in scrape(server)
    run(http, "metrics_api", {"do": "drop_metric", "key": "e"})
    assert samples(scrape(server), "ek_registered") == {'ek_registered{k="v"}': "3"}  # its family holds it
    run(http, "metrics_api", {"do": "drop_family", "key": "e"})
    assert "ek_registered" not in scrape(server)

    assert run(http, "metrics_api",
               {"do": "family", "key": "e", "name": "ek_registered", "kind": "COUNTER"},
               {"do": "family", "key": "e", "name": "ek_registered", "kind": "GAUGE", "description": "not this one"},
               {"do": "metric", "key": "e", "family": "e", "labels": {"k": "w"}},
               {"do": "set", "key": "e", "values": [4]}) == [
        {"error": f"Error when creating MetricFamily: {_REFUSED}Family name already exists with different type"},
        None, None, None]
    text = scrape(server)
    assert "# HELP ek_registered first\n# TYPE ek_registered gauge\n" in text and "not this one" not in text
    assert samples(text, "ek_registered") == {'ek_registered{k="w"}': "4"}
    run(http, "metrics_api", {"do": "drop_family", "key": "e"})


def test_a_family_of_a_server_metric_name_joins_it(server, http):
    """Triton's models share its registry: a COUNTER ``nv_inference_count`` is the server's family (its
    description, its one ``# TYPE``), a Metric with a server series' labels counts into that series, others add
    series to it; another kind, or any kind of a summary's name, is refused (Triton 2.51)."""
    own = 'nv_inference_count{model="metrics_api",version="1"}'
    results = run(http, "metrics_api",
                  {"do": "family", "key": "n", "name": "nv_inference_count", "kind": "COUNTER",
                   "description": "not shown"},
                  {"do": "metric", "key": "n", "family": "n", "labels": {"model": "metrics_api", "version": "1"}},
                  {"do": "value", "key": "n"})
    assert results[:2] == [None, None]
    before = results[2]  # the server's count: the requests before this one
    text = scrape(server)
    assert float(samples(text, "nv_inference_count")[own]) == before + 1
    assert run(http, "metrics_api", {"do": "increment", "key": "n", "values": [100]},
               {"do": "value", "key": "n"},
               {"do": "metric", "key": "c", "family": "n", "labels": {"custom": "yes"}},
               {"do": "increment", "key": "c", "values": [7]}) == [None, before + 101, None, None]
    text = scrape(server)
    assert float(samples(text, "nv_inference_count")[own]) == before + 102
    assert float(samples(text, "nv_inference_count")['nv_inference_count{custom="yes"}']) == 7
    assert text.count("# TYPE nv_inference_count ") == 1 and "not shown" not in text
    block = text.split("# TYPE nv_inference_count ")[1].split("# HELP")[0]
    assert 'nv_inference_count{custom="yes"}' in block  # in the server's family, not after the server's metrics

    assert run(http, "metrics_api",
               {"do": "family", "key": "x", "name": "nv_inference_request_summary_us", "kind": "HISTOGRAM"},
               {"do": "family", "key": "x", "name": "nv_inference_pending_request_count", "kind": "COUNTER"},
               {"do": "family", "key": "g", "name": "nv_gpu_utilization", "kind": "GAUGE", "description": "mine"},
               {"do": "metric", "key": "g", "family": "g", "labels": {"gpu_uuid": "GPU-0"}},
               {"do": "set", "key": "g", "values": [0.5]}) == [
        {"error": f"Error when creating MetricFamily: {_REFUSED}Family name already exists with different type"},
        {"error": f"Error when creating MetricFamily: {_REFUSED}Family name already exists with different type"},
        None, None, None]
    text = scrape(server)  # a family of Triton's this server does not show: Triton's description and kind
    assert ("# HELP nv_gpu_utilization GPU utilization rate [0.0 - 1.0)\n# TYPE nv_gpu_utilization gauge\n"
            'nv_gpu_utilization{gpu_uuid="GPU-0"} 0.5\n') in text

    run(http, "metrics_api", {"do": "drop_family", "key": "n"}, {"do": "drop_family", "key": "g"})
    text = scrape(server)
    assert "custom=" not in text and "nv_gpu_utilization" not in text
    assert own in samples(text, "nv_inference_count")  # the server's own series stays (Triton's goes)
