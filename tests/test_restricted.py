"""Parsing of Triton's restricted-API flags (enforcement is tested with each front)."""

import pytest

from kernel.restricted import GRPC_PREFIX, Restrictions, grpc_message, http_message


def test_categories_share_one_key_and_grpc_keys_carry_tritons_prefix() -> None:
    rules = Restrictions.parse(["model-repository, shared-memory:Admin-Key=secret", "inference:k=v"])
    assert rules.rules == {"model-repository": ("admin-key", "secret"), "shared-memory": ("admin-key", "secret"),
                           "inference": ("k", "v")}
    grpc = Restrictions.parse(["statistics:admin-key=secret"], key_prefix=GRPC_PREFIX)
    assert grpc.refusal("statistics", {}.get) == "triton-grpc-protocol-admin-key"
    assert grpc.refusal("statistics", {"triton-grpc-protocol-admin-key": "secret"}.get) is None
    assert grpc.refusal("statistics", {"triton-grpc-protocol-admin-key": "wrong"}.get) is not None
    assert grpc.refusal("inference", {}.get) is None
    assert not Restrictions() and grpc
    assert http_message("admin-key") == "This API is restricted, expecting header 'admin-key'"
    assert grpc_message("k") == "This protocol is restricted, expecting header 'k'"


@pytest.mark.parametrize("spec", ["model-repository", "model-repository:key", ":k=v", "nope:k=v",
                                  "statistics,statistics:k=v"])
def test_malformed_flags_are_named(spec: str) -> None:
    with pytest.raises(ValueError):
        Restrictions.parse([spec])
