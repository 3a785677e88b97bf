"""Business logic scripting (BLS): python models calling other models, the front's side.

A worker's ``pb_utils.InferenceRequest.exec()`` (workers.bls) sends a ``b`` message on the
worker's outbox ring: the target model, and the inputs as ``loc`` lists that point into the
calling worker's arena. Here it becomes an ordinary request, submitted through the target's
scheduler; its inputs are passed to the target's worker by reference (never copied into the
front), and the answer goes back on the calling worker's third ring, ``replies``, so that BLS
answers never queue behind batches. The answer's outputs are ``loc`` lists into the target
worker's arena: the caller maps them; the response is held here until the caller says it is done
with it (``bf``: the call has ended and the model holds none of its output arrays any more).

Messages (worker -> front, on the outbox): ``{"t": "b", "q": id, "m": model, "v": version, "in": [loc],
"out": [names], "rid": request id, "p": parameters (JSON), "d": decoupled, "to": timeout (us), "cid": correlation
ID, "fl": sequence flags}`` and
``{"t": "bf", "q": [ids]}``. Front -> worker (on replies): ``{"q": id, "res": {"out": [loc]} |
{"err": [message, code]} | None, "final": bool}``.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

from kernel.errors import ServerError
from kernel.types import ArenaRef, InferRequest, InferResponse, InputTensor, RequestedOutput

if TYPE_CHECKING:
    from kernel.instance import Instance

log = logging.getLogger("kernel")


class BlsHandler:
    """Runs the BLS requests of every python model's workers."""

    def __init__(self, core: Any) -> None:
        self.core = core
        #: responses a worker still reads: (instance, request id) -> responses
        self._held: dict[tuple[int, int], list[InferResponse]] = {}

    def handle(self, instance: Instance, msg: dict) -> None:
        """A message of kind ``b`` or ``bf`` from ``instance``'s worker."""
        if msg["t"] == "gone":
            self.forget(instance)
            return
        if msg["t"] == "bf":
            for qid in msg["q"]:
                for response in self._held.pop((id(instance), qid), ()):
                    response.release()
            return
        qid = msg["q"]
        model = msg["m"]
        self.core.bls_called(instance.model_name)
        if not self.core.model_ready(model, msg.get("v") or ""):
            self._answer(instance, qid, ServerError(
                f"Model {model} - Error when running inference: Failed for execute the inference request. "
                f"Model '{model}' is not ready.", "INTERNAL"), True)
            return
        try:
            request = self._request(instance, msg)
            if msg.get("d"):
                self.core.stream(request, lambda r, final: self._answer(instance, qid, r, final))
            else:
                future = self.core.submit(request)
                future.add_done_callback(lambda f: self._answer(instance, qid, _outcome(f), True))
        except ServerError as e:  # refused before it ran: Triton's BLS names the model first
            self._answer(instance, qid, ServerError(f"Model {model} - Error when running inference: {e.message}",
                                                    e.code), True)
        except Exception as e:  # never let a model's odd request take the front down
            log.exception("BLS request of instance %s failed", instance.name)
            self._answer(instance, qid, ServerError(f"{type(e).__name__}: {e}", "INTERNAL"), True)

    def _place(self, response: InferResponse, data: memoryview) -> tuple[str, int]:
        """Copy ``data`` into a block of the front's arena, freed when ``response`` is released."""
        arena = self.core.arena
        key, offset = arena.alloc(data.nbytes)
        arena.view(key, offset, data.nbytes)[:] = data
        release = response._release

        def free() -> None:
            arena.free(key, offset)
            if release is not None:
                release()

        response._release = free
        return key, offset

    def forget(self, instance: Instance) -> None:
        """The worker went away: let go of what it still held."""
        key = id(instance)
        for held in [k for k in self._held if k[0] == key]:
            for response in self._held.pop(held):
                response.release()

    def _request(self, instance: Instance, msg: dict) -> InferRequest:
        inputs = []
        for name, datatype, shape, key, offset, nbytes, _ in msg["in"]:
            if nbytes:
                data: Any = ArenaRef(key, offset, nbytes, instance.buffer(key)[offset : offset + nbytes])
            else:
                data = memoryview(b"")
            inputs.append(InputTensor(name, datatype, list(shape), data))
        names = msg.get("out") or []
        parameters = json.loads(msg["p"]) if msg.get("p") else {}
        if msg.get("to"):
            parameters["timeout"] = msg["to"]
        if msg.get("cid"):  # pb_utils.InferenceRequest(correlation_id=..., flags=...): a request of a sequence
            parameters["sequence_id"] = msg["cid"]
            parameters.update({k: True for k, bit in (("sequence_start", 1), ("sequence_end", 2)) if msg["fl"] & bit})
        request = InferRequest(msg["m"], msg.get("v") or "", msg.get("rid") or "", inputs,
                               [RequestedOutput(n) for n in names] or None, parameters)
        if msg.get("tr"):  # made with its caller's trace: traced as that trace's child, as Triton does
            parent = self.core.tracer.live.get(msg["tr"])
            if parent is not None:
                request.trace = parent.child(self.core.tracer)
        return request

    def _answer(self, instance: Instance, qid: int, outcome: Any, final: bool) -> None:
        if isinstance(outcome, InferResponse):
            if outcome.error is not None:
                result: Any = {"err": [outcome.error.message, outcome.error.code]}
                outcome.release()
            else:
                outs = []
                for out in outcome.outputs:
                    if out.ref is not None:
                        outs.append([out.name, out.datatype, out.shape, out.ref[0], out.ref[1], out.byte_size, 0])
                    elif out.byte_size and out.data is not None:  # bytes the front holds (a response-cache
                        key, offset = self._place(outcome, out.data)  # hit): the worker reads them in its arena
                        outs.append([out.name, out.datatype, out.shape, key, offset, out.byte_size, 0])
                    else:
                        outs.append([out.name, out.datatype, out.shape, "", 0, 0, 0])
                result = {"out": outs}
                if outcome.parameters:
                    result["p"] = outcome.parameters
                self._held.setdefault((id(instance), qid), []).append(outcome)
        elif isinstance(outcome, ServerError):
            result = {"err": [outcome.message, outcome.code]}
        elif isinstance(outcome, BaseException):
            result = {"err": [str(outcome), "INTERNAL"]}
        else:
            result = None
        instance.reply({"q": qid, "res": result, "final": final})


def _outcome(future: Any) -> Any:
    if future.cancelled():
        return ServerError("the request was cancelled", "CANCELLED")
    error = future.exception()
    return error if error is not None else future.result()
