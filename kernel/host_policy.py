"""Host policies (tritonserver's ``--host-policy=<name>,<setting>=<value>``): where a model instance runs.

A policy has ``cpu-cores`` (ranges ``<lower>-<upper>``, comma-separated: the instance runs on one of
those cores) and ``numa-node`` (its memory comes from that node). An instance group names its policy
in ``host_policy``; without one it gets the default of its kind, as in Triton: ``cpu`` for KIND_CPU,
``model`` for KIND_MODEL, ``gpu_<device>`` for KIND_GPU. A policy nobody defined is no policy.

Triton binds the instance's thread; here an instance is a worker process, so the worker applies the
policy to itself before its backend loads (kernel.instance sends it with ``init``; threads the backend
starts inherit it). On a Jetson this keeps a camera pipeline's workers on cores of their own, their
caches warm between frames (docs/performance-notes.md).
"""

from __future__ import annotations

from kernel.errors import ServerError

SETTINGS = ("numa-node", "cpu-cores")


def parse_setting(text: str) -> tuple[str, str, str]:
    """``<policy>,<setting>=<value>`` -> (policy, setting, value), with Triton's messages for what it refuses."""
    name, comma, rest = text.partition(",")
    setting, eq, value = rest.partition("=")
    if not comma or not name or not eq:
        raise ValueError(f"--host-policy expects <policy name>,<setting>=<value>, got '{text}'")
    if setting not in SETTINGS:
        raise ValueError(f"Unsupported host policy setting '{setting}' is specified, supported settings are "
                         "'numa-node', 'cpu-cores'")
    if setting == "cpu-cores":
        cpu_cores(value)
    else:
        numa_node(value)
    return name, setting, value


def cpu_cores(value: str) -> list[int]:
    """Triton's ``cpu-cores`` format: ``<lower>-<upper>`` ranges, comma-separated (``0-3,6-6``)."""
    cores: list[int] = []
    for part in value.split(","):
        lower, dash, upper = part.partition("-")
        if not dash:
            raise ValueError(f"host policy setting 'cpu-cores' format is '<lower_cpu_core_id>-<upper_cpu_core_id>'. "
                             f"Got {part}")
        try:
            cores.extend(range(int(lower), int(upper) + 1))
        except ValueError:
            raise ValueError(f"failed to parse 'cpu-cores' value '{part}'") from None
    return cores


def numa_node(value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"failed to parse 'numa-node' value '{value}'") from None


def policy_name(group_policy: str, kind: str, device: int) -> str:
    """The policy an instance follows: its group's, else the default of its kind."""
    if group_policy:
        return group_policy
    return {"CPU": "cpu", "MODEL": "model"}.get(kind, f"gpu_{device}")


def placement(policies: dict[str, dict[str, str]], name: str) -> dict:
    """What a worker applies for policy ``name`` (empty: nothing to apply)."""
    policy = policies.get(name)
    if not policy:
        return {}
    try:
        out: dict = {}
        if "cpu-cores" in policy:
            out["cpu_cores"] = cpu_cores(policy["cpu-cores"])
        if "numa-node" in policy:
            out["numa_node"] = numa_node(policy["numa-node"])
        return out
    except ValueError as e:
        raise ServerError(str(e), "INVALID_ARG") from None
