"""Restricted API categories: Triton's ``--http-restricted-api`` and ``--grpc-restricted-protocol``.

An operator protects groups of endpoints (model control, shared memory, statistics...) on a device whose
HTTP or gRPC port is reachable by other hosts: a request in a restricted category is answered only when it
carries a header (HTTP) or metadata entry (gRPC) with the configured value. Both flags take Triton's
syntax, ``<category>[,<category>...]:<key>=<value>``, and may be repeated; a category may be named once.
Over gRPC Triton expects the metadata key with the prefix ``triton-grpc-protocol-``, and so does this
server, so clients written for Triton keep working.

The protocols own the mapping from their endpoints to a category; this module only parses and checks,
so that both fronts word the refusal the same way Triton does. It also holds the other header-driven
policy both fronts share: the headers forwarded to the model as request parameters.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any

CATEGORIES = ("health", "metadata", "inference", "shared-memory", "model-config", "model-repository",
              "statistics", "trace", "logging")
GRPC_PREFIX = "triton-grpc-protocol-"


class Restrictions:
    """Which categories need which ``(key, value)``; empty means nothing is restricted."""

    def __init__(self, rules: dict[str, tuple[str, str]] | None = None) -> None:
        self.rules = dict(rules or {})

    def __bool__(self) -> bool:
        return bool(self.rules)

    @classmethod
    def parse(cls, specs: list[str], *, key_prefix: str = "") -> Restrictions:
        """Parse flag values; ``ValueError`` names the mistake (the CLI exits with it)."""
        rules: dict[str, tuple[str, str]] = {}
        for spec in specs:
            apis, sep, pair = spec.partition(":")
            key, eq, value = pair.partition("=")
            if not sep or not eq or not key.strip() or not apis.strip():
                raise ValueError(f"restricted api '{spec}': expected <category>[,<category>...]:<key>=<value>")
            for api in (a.strip() for a in apis.split(",")):
                if api not in CATEGORIES:
                    raise ValueError(f"unknown restricted api category '{api}', expected one of "
                                     + ", ".join(CATEGORIES))
                if api in rules:
                    raise ValueError(f"restricted api category '{api}' is given more than once")
                rules[api] = (key_prefix + key.strip().lower(), value)
        return cls(rules)

    def refusal(self, category: str, header: Callable[[str], str | None]) -> str | None:
        """The key the request lacks when it may not use ``category`` (``header`` looks up a lower-case
        header or metadata key), else None; ``http_message``/``grpc_message`` word the answer."""
        rule = self.rules.get(category)
        if rule is None or header(rule[0]) == rule[1]:
            return None
        return rule[0]


def http_message(key: str) -> str:
    """Triton's HTTP answer (403) to a refused request."""
    return f"This API is restricted, expecting header '{key}'"


def grpc_message(key: str) -> str:
    """Triton's gRPC answer (UNAVAILABLE) to a refused call."""
    return f"This protocol is restricted, expecting header '{key}'"


def forward_headers(pattern: re.Pattern, headers: Iterable[tuple[str, str]], request: Any) -> None:
    """``--http-header-forward-pattern`` / ``--grpc-header-forward-pattern``: each header whose name matches
    (anywhere in it, as RE2's PartialMatch) becomes a string parameter of the request, as in Triton. Names
    are lower-case here (HTTP/2 sends them so; this HTTP/1.1 server folds them); pseudo-headers never match."""
    for key, value in headers:
        if not key.startswith(":") and pattern.search(key):
            request.parameters[key] = value
