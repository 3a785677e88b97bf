"""Mode opentelemetry's own settings of Triton's trace extension (``--trace-config
opentelemetry,url=|resource=|bsp_*=``), read and checked as Triton reads them, with its messages
(docs/triton-behaviour.md §15).

Kept apart from kernel.otel, which imports the OpenTelemetry SDK (the optional ``otel`` extra), and free of
it: kernel.tracing.Tracer checks every setting before it loads kernel.otel, so without the extra a bad setting
is still reported as such, and the missing packages only for a valid configuration.
"""

from __future__ import annotations

import os
import re
from typing import Any

from kernel.errors import invalid

#: ``std::stoul``'s reading: leading digits count, the rest is ignored
_LEADING_INT = re.compile(r"\s*[+-]?\d+")
_U32 = 1 << 32
#: the BatchSpanProcessor settings: their environment variable (read as Triton does, for a default) and default
BSP = {"bsp_max_queue_size": ("OTEL_BSP_MAX_QUEUE_SIZE", "2048"),
       "bsp_schedule_delay": ("OTEL_BSP_SCHEDULE_DELAY", "5000"),
       "bsp_max_export_batch_size": ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "512")}


def settings(items: Any) -> list[tuple[str, str]]:
    """``--trace-config opentelemetry,<key>=<value>`` pairs (or a dict) checked, as Triton reads them back:
    in the order given, the ``bsp_*`` values as numbers, then the ``bsp_*`` defaults not given (from
    ``OTEL_BSP_*`` when set, as Triton takes them). Stricter than Triton where it would do something
    unexpected quietly: an unknown key, a resource without ``<key>=``, a zero queue or batch size."""
    pairs = list(items.items()) if isinstance(items, dict) else list(items)
    checked: list[tuple[str, str]] = []
    for key, value in pairs:
        value = str(value)
        if key in BSP:
            checked.append((key, str(_stoul(f"--trace-config opentelemetry,{key}", value, key))))
        elif key == "url":
            checked.append((key, value))
        elif key == "resource":
            name, eq, _ = value.partition("=")
            if not eq or not name:
                raise invalid(f'Bad option: "--trace-config opentelemetry,resource". Expected <key>=<value>, '
                              f"got {value}")
            checked.append((key, value))
        else:
            raise invalid(f"unknown trace setting 'opentelemetry,{key}' (url, resource, {', '.join(BSP)})")
    given = {key for key, _ in checked}
    for key, (env, default) in BSP.items():
        if key not in given:
            checked.append((key, str(_stoul(env, os.environ.get(env, default), key))))
    return checked


def _stoul(option: str, text: str, key: str) -> int:
    """``std::stoul`` to ``uint32_t`` as Triton's parser calls it, with its messages; a zero queue or export
    batch size is refused (the SDK's processor cannot have one)."""
    match = _LEADING_INT.match(text)
    if match is None:
        raise invalid(f'Bad option: "{option}". Invalid option value. Got {text}')
    value = int(match.group())
    if abs(value) >= 1 << 64:
        raise invalid(f'Bad option: "{option}". Provided option value is out of bound. Got {text}')
    value = value % (1 << 64) % _U32  # stoul wraps a negative value; the cast keeps the low 32 bits
    if value == 0 and key != "bsp_schedule_delay":
        raise invalid(f'Bad option: "{option}". The value must be positive. Got {text}')
    return value
