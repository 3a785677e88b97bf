"""Host policies (``--host-policy``, instance_group ``host_policy``): the cores a model's workers run on."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from kernel import host_policy
from kernel.api import Server
from tests.support import ROOT, python_model

ECHO = '''
import os
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):  # answers the cores it may run on
        cores = np.array(sorted(os.sched_getaffinity(0)), dtype=np.int32)
        return [pb_utils.InferenceResponse([pb_utils.Tensor("CORES", cores)]) for _ in requests]
'''
IO = '''max_batch_size: 0
input [ { name: "IN", data_type: TYPE_INT32, dims: [ 1 ] } ]
output [ { name: "CORES", data_type: TYPE_INT32, dims: [ -1 ] } ]
'''


def test_settings_parse_as_tritonserver_reads_them():
    assert host_policy.parse_setting("gpu_0,cpu-cores=0-3,6-6") == ("gpu_0", "cpu-cores", "0-3,6-6")
    assert host_policy.cpu_cores("0-3,6-6") == [0, 1, 2, 3, 6]
    with pytest.raises(ValueError, match="Unsupported host policy setting 'cores' is specified, supported settings "
                                         "are 'numa-node', 'cpu-cores'"):
        host_policy.parse_setting("cpu,cores=1")
    with pytest.raises(ValueError, match="'cpu-cores' format is '<lower_cpu_core_id>-<upper_cpu_core_id>'. Got 5"):
        host_policy.parse_setting("cpu,cpu-cores=0-3,5")
    with pytest.raises(ValueError, match="expects <policy name>,<setting>=<value>"):
        host_policy.parse_setting("cpu-cores=1-1")
    assert [host_policy.policy_name("", k, 1) for k in ("CPU", "MODEL", "GPU")] == ["cpu", "model", "gpu_1"]
    assert host_policy.policy_name("mine", "GPU", 0) == "mine"


def test_the_cli_refuses_an_unknown_setting():
    out = subprocess.run([sys.executable, "-m", "kernel", "start", "--host-policy=cpu,threads=2"],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 2 and "Unsupported host policy setting 'threads'" in out.stderr


def test_workers_run_on_the_cores_of_their_policy(tmp_path):
    cores = sorted(os.sched_getaffinity(0))
    first, last = cores[0], cores[-1]
    python_model(tmp_path, "pinned", ECHO, IO + 'instance_group [ { kind: KIND_CPU, host_policy: "mine" } ]\n')
    python_model(tmp_path, "by_kind", ECHO, IO)  # no group: the default policy of KIND_CPU, "cpu"
    python_model(tmp_path, "nowhere", ECHO, IO + 'instance_group [ { kind: KIND_CPU, host_policy: "bad" } ]\n')
    python_model(tmp_path, "free", ECHO, IO + 'instance_group [ { kind: KIND_CPU, host_policy: "undefined" } ]\n')
    policies = {"mine": {"cpu-cores": f"{last}-{last}"}, "cpu": {"cpu-cores": f"{first}-{first}"},
                "bad": {"cpu-cores": "100000-100000"}}
    with Server(model_repository=tmp_path, host_policy=policies, strict_readiness=False) as srv:
        def run_on(model: str) -> list[int]:
            with srv.model(model).infer({"IN": np.zeros(1, np.int32)}) as result:
                return result["CORES"].tolist()

        assert run_on("pinned") == [last]
        assert run_on("by_kind") == [first]
        assert run_on("free") == cores  # a policy nobody defined: no constraint
        status = {m["name"]: m for m in srv.models()}["nowhere"]
        assert status["state"] == "UNAVAILABLE"
        assert "Unable to set NUMA thread affinity: Invalid argument" in status["reason"]


@pytest.mark.parametrize("node, error", [(0, ""), (4095, "Unable to set NUMA memory policy: Invalid argument")])
def test_a_numa_node_binds_the_workers_memory(node, error):
    """set_mempolicy(2) in a process of its own (it binds the calling thread's memory for good)."""
    code = ("from workers.backend import BackendError\nfrom workers.runtime import place\n"
            f"try:\n    place({{'numa_node': {node}}})\nexcept BackendError as e:\n    print(e.message)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    numa = os.path.isdir("/sys/devices/system/node")  # a kernel without NUMA has no node to refuse (ENOSYS)
    assert out.stdout.strip() == (error if numa else "")
