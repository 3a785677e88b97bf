"""How the transports wait for an answer: through a future's synchronous taker where it has one.

A done callback runs on a later turn of the event loop, and uvloop polls for I/O before it: an
answer that is ready waits behind the parsing of every request that arrived meanwhile, and each
callback costs a handle on the loop. The core's request futures (kernel.model.RequestFuture) take
one taker instead, ``future.then``, called as soon as the worker's answer that settles the request
has been handled. The transports stay generic: any other future gets a done callback.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


def when_done(future: asyncio.Future, fn: Callable[[asyncio.Future], None]) -> None:
    """``fn(future)`` once ``future`` is done: as its taker where it offers one (and has none yet)."""
    if getattr(future, "then", 0) is None and not future.done():  # (a request's, with no taker yet)
        future.then = fn
    else:
        future.add_done_callback(fn)
