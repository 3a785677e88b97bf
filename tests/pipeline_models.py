"""Models for the pipeline tests (tests/test_pipelines.py): small python models, ensembles over them,
and the ensembles' invalid variants, each written into a repository by :func:`build`."""

from __future__ import annotations

import shutil
from pathlib import Path

#: python models: name -> (config body, execute's per-request expression of ``x`` -> outputs dict)
_ARITH = '''
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for r in requests:
            x = pb_utils.get_input_tensor_by_name(r, "{inp}").as_numpy()
            {body}
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("{out}", y)]))
        return responses
'''


def _io(inputs: list[tuple[str, str, str]], outputs: list[tuple[str, str, str]], mbs: int = 0) -> str:
    def spec(name: str, dt: str, dims: str) -> str:
        return f'{{ name: "{name}", data_type: TYPE_{dt}, dims: [ {dims} ] }}'

    return (f"max_batch_size: {mbs}\n"
            f"input [ {', '.join(spec(*t) for t in inputs)} ]\n"
            f"output [ {', '.join(spec(*t) for t in outputs)} ]\n")


def _python(dest: Path, name: str, config: str, code: str) -> None:
    (dest / name / "1").mkdir(parents=True, exist_ok=True)
    (dest / name / "config.pbtxt").write_text('backend: "python"\n' + config)
    (dest / name / "1" / "model.py").write_text(code)


def _ensemble(dest: Path, name: str, io: str, steps: list[tuple[str, dict, dict]], extra: str = "") -> None:
    (dest / name / "1").mkdir(parents=True, exist_ok=True)
    text = ['platform: "ensemble"\n', io, extra, "ensemble_scheduling {\n"]
    for model, inputs, outputs in steps:
        text.append(f'  step {{ model_name: "{model}" model_version: -1\n')
        for k, v in inputs.items():
            text.append(f'    input_map {{ key: "{k}" value: "{v}" }}\n')
        for k, v in outputs.items():
            text.append(f'    output_map {{ key: "{k}" value: "{v}" }}\n')
        text.append("  }\n")
    text.append("}\n")
    (dest / name / "config.pbtxt").write_text("".join(text))


def arith(dest: Path, name: str, body: str, dt_in: str = "FP32", dt_out: str = "FP32", mbs: int = 0,
          extra: str = "", dims: str = "-1") -> None:
    """A python model ``IN`` -> ``OUT`` (``y`` computed from ``x`` by ``body``)."""
    _python(dest, name, _io([("IN", dt_in, dims)], [("OUT", dt_out, dims)], mbs) + extra,
            _ARITH.format(inp="IN", out="OUT", body=body))


def build(dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    # preprocess -> (scale, shift in parallel) -> combine: a diamond
    arith(dest, "pre", "y = (x * 2).astype(np.float32)")
    arith(dest, "scale", "y = (x * 10).astype(np.float32)")
    arith(dest, "shift", "y = (x + 1).astype(np.float32)")
    arith(dest, "fails", "raise ValueError('step failed on purpose')")
    _python(dest, "combine", _io([("A", "FP32", "-1"), ("B", "FP32", "-1")], [("SUM", "FP32", "-1")]), '''
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        out = []
        for r in requests:
            a = pb_utils.get_input_tensor_by_name(r, "A").as_numpy()
            b = pb_utils.get_input_tensor_by_name(r, "B").as_numpy()
            out.append(pb_utils.InferenceResponse([pb_utils.Tensor("SUM", a + b)]))
        return out
''')
    io = _io([("INPUT", "FP32", "-1")], [("OUTPUT", "FP32", "-1"), ("PRE", "FP32", "-1")])
    diamond = [("pre", {"IN": "INPUT"}, {"OUT": "PRE"}),
               ("scale", {"IN": "PRE"}, {"OUT": "SCALED"}),
               ("shift", {"IN": "PRE"}, {"OUT": "SHIFTED"}),
               ("combine", {"A": "SCALED", "B": "SHIFTED"}, {"SUM": "OUTPUT"})]
    _ensemble(dest, "diamond", io, diamond)
    one = _io([("INPUT", "FP32", "-1")], [("OUTPUT", "FP32", "-1")])
    _ensemble(dest, "failing", one, [("pre", {"IN": "INPUT"}, {"OUT": "PRE"}),
                                      ("fails", {"IN": "PRE"}, {"OUT": "OUTPUT"})])
    # a middle step that batches dynamically (slow enough that concurrent requests queue)
    arith(dest, "batched", "import time; time.sleep(0.05); y = (x * 3).astype(np.float32)", mbs=8,
          extra="dynamic_batching { max_queue_delay_microseconds: 100000 }\n")
    arith(dest, "pre_b", "y = (x * 2).astype(np.float32)", mbs=8)
    arith(dest, "post_b", "y = (x + 1).astype(np.float32)", mbs=8)
    _ensemble(dest, "batching", _io([("INPUT", "FP32", "-1")], [("OUTPUT", "FP32", "-1")], mbs=8),
              [("pre_b", {"IN": "INPUT"}, {"OUT": "A"}), ("batched", {"IN": "A"}, {"OUT": "B"}),
               ("post_b", {"IN": "B"}, {"OUT": "OUTPUT"})])
    # large intermediates: 1 MiB in, 4 MiB between the steps (the copy counter's test)
    arith(dest, "widen", "y = np.repeat(x, 4).astype(np.float32)")
    arith(dest, "narrow", "y = x.reshape(-1, 4).sum(axis=1).astype(np.float32)")
    _ensemble(dest, "wide", one, [("widen", {"IN": "INPUT"}, {"OUT": "W"}),
                                   ("narrow", {"IN": "W"}, {"OUT": "OUTPUT"})])
    # a step whose worker dies on a negative input (restarted by the server)
    shutil.copytree(Path(__file__).parent / "models" / "crasher", dest / "crasher")
    _ensemble(dest, "crashing", one, [("pre", {"IN": "INPUT"}, {"OUT": "PRE"}),
                                       ("crasher", {"INPUT0": "PRE"}, {"OUTPUT0": "OUTPUT"})])
    # a decoupled step: one response of `repeat` per element of IN, each doubled by the next step
    shutil.copytree(Path(__file__).parent / "models" / "repeat", dest / "repeat")
    arith(dest, "twice", "y = (x * 2).astype(np.int32)", dt_in="INT32", dt_out="INT32")
    _ensemble(dest, "fanout", _io([("IN", "INT32", "-1")], [("OUTPUT", "INT32", "-1"), ("IDX", "UINT32", "1")]),
              [("repeat", {"IN": "IN"}, {"OUT": "X", "IDX": "IDX"}), ("twice", {"IN": "X"}, {"OUT": "OUTPUT"})])
    return dest


#: Invalid ensembles: name -> (config text, the reason Triton gives). Composing models are from build().
_ONE = _io([("INPUT", "FP32", "-1")], [("OUTPUT", "FP32", "-1")])


def _steps(*steps: tuple[str, dict, dict]) -> str:
    text = ["ensemble_scheduling {\n"]
    for model, inputs, outputs in steps:
        text.append(f'  step {{ model_name: "{model}" model_version: -1\n')
        text += [f'    input_map {{ key: "{k}" value: "{v}" }}\n' for k, v in inputs.items()]
        text += [f'    output_map {{ key: "{k}" value: "{v}" }}\n' for k, v in outputs.items()]
        text.append("  }\n")
    return "".join(text) + "}\n"


INVALID = {
    "bad_unknown": (_ONE + _steps(("no_such_model", {"IN": "INPUT"}, {"OUT": "OUTPUT"})),
                    "ensemble bad_unknown contains models that are not available or ambiguous: no_such_model"),
    "bad_no_steps": (_ONE + "ensemble_scheduling { }\n", "must specify 'step' for ensemble 'bad_no_steps'"),
    "bad_dtype": (_io([("INPUT", "INT32", "-1")], [("OUTPUT", "FP32", "-1")])
                  + _steps(("pre", {"IN": "INPUT"}, {"OUT": "OUTPUT"})),
                  "in ensemble bad_dtype, ensemble tensor INPUT: inconsistent data type: TYPE_INT32 is inferred "
                  "from model bad_dtype while TYPE_FP32 is inferred from model pre"),
    "bad_shape": (_io([("INPUT", "FP32", "3, 4")], [("OUTPUT", "FP32", "-1")])
                  + _steps(("pre", {"IN": "INPUT"}, {"OUT": "OUTPUT"})),
                  "in ensemble bad_shape, ensemble tensor INPUT: inconsistent shape: [3,4] is inferred from model "
                  "bad_shape while [-1] is inferred from model pre"),
    "bad_input_unmapped": (_io([("INPUT", "FP32", "-1")], [("OUTPUT", "FP32", "-1")])
                           + _steps(("combine", {"A": "INPUT"}, {"SUM": "OUTPUT"})),
                           "in ensemble bad_input_unmapped, input B in model combine is not mapped to any ensemble "
                           "tensors"),
    "bad_input_name": (_ONE + _steps(("pre", {"IN": "INPUT", "NOPE": "INPUT"}, {"OUT": "OUTPUT"})),
                       "in ensemble bad_input_name, ensemble tensor INPUT is mapping to non-existing input NOPE in "
                       "model pre"),
    "bad_output_name": (_ONE + _steps(("pre", {"IN": "INPUT"}, {"NOPE": "OUTPUT"})),
                        "in ensemble bad_output_name, ensemble tensor OUTPUT is mapped from non-existing output NOPE "
                        "in model pre"),
    "bad_not_written": (_io([("INPUT", "FP32", "-1")], [("OUTPUT", "FP32", "-1"), ("OTHER", "FP32", "-1")])
                        + _steps(("pre", {"IN": "INPUT"}, {"OUT": "OUTPUT"}),
                                 ("shift", {"IN": "LOOP"}, {"OUT": "OTHER"})),
                        "output 'OTHER' for ensemble 'bad_not_written' is not written"),
    "bad_unused_input": (_io([("INPUT", "FP32", "-1"), ("SPARE", "FP32", "-1")], [("OUTPUT", "FP32", "-1")])
                         + _steps(("pre", {"IN": "INPUT"}, {"OUT": "OUTPUT"})),
                         "ensemble input 'SPARE' for ensemble bad_unused_input' is not used"),
    "bad_unused_tensor": (_ONE + _steps(("pre", {"IN": "INPUT"}, {"OUT": "OUTPUT"}),
                                        ("shift", {"IN": "INPUT"}, {"OUT": "DANGLING"})),
                          "ensemble tensor 'DANGLING' is unused in ensemble 'bad_unused_tensor'"),
    "bad_twice": (_ONE + _steps(("pre", {"IN": "INPUT"}, {"OUT": "OUTPUT"}),
                                ("shift", {"IN": "INPUT"}, {"OUT": "OUTPUT"})),
                  "ensemble tensor 'OUTPUT' can appear in an output map only once for ensemble 'bad_twice' step 1"),
    "bad_batch": (_io([("INPUT", "FP32", "-1")], [("OUTPUT", "FP32", "-1")], mbs=16)
                  + _steps(("pre_b", {"IN": "INPUT"}, {"OUT": "OUTPUT"})),
                  "ensemble bad_batch allows maximum batch size 16, but it contains model pre_b which only allows "
                  "maximum batch size to be 8"),
    "bad_cycle_a": (_ONE + _steps(("bad_cycle_b", {"INPUT": "INPUT"}, {"OUTPUT": "OUTPUT"})),
                    "circular dependency between ensembles: bad_cycle_a -> ... -> bad_cycle_b -> bad_cycle_a"),
    "bad_cycle_b": (_ONE + _steps(("bad_cycle_a", {"INPUT": "INPUT"}, {"OUTPUT": "OUTPUT"})),
                    "circular dependency between ensembles: bad_cycle_b -> ... -> bad_cycle_a -> bad_cycle_b"),
}


#: The invalid ensembles Triton refuses when it reads the repository ("failed to poll"; the reason goes to its log);
#: it refuses the others when it checks them against their composing models.
POLL_FAILURES = {"bad_no_steps", "bad_not_written", "bad_unused_input", "bad_unused_tensor", "bad_twice"}


def build_invalid(dest: Path) -> None:
    for name, (config, _) in INVALID.items():
        (dest / name / "1").mkdir(parents=True, exist_ok=True)
        (dest / name / "config.pbtxt").write_text('platform: "ensemble"\n' + config)


_BLS_SYNC = '''
import numpy as np
import triton_python_backend_utils as pb_utils
from workers import bls  # edge-kernel's BLS client, to count what it copies


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for r in requests:
            x = pb_utils.get_input_tensor_by_name(r, "IN")
            first = pb_utils.InferenceRequest(model_name="pre", inputs=[pb_utils.Tensor("IN", x.as_numpy())],
                                              requested_output_names=["OUT"], timeout=1_000_000,
                                              preferred_memory=pb_utils.PreferredMemory(
                                                  pb_utils.TRITONSERVER_MEMORY_CPU, 0)).exec()
            if first.has_error():
                raise pb_utils.TritonModelException(first.error().message())
            pre = pb_utils.get_output_tensor_by_name(first, "OUT")
            second = pb_utils.InferenceRequest(model_name="scale", inputs=[pb_utils.Tensor("IN", pre.as_numpy())],
                                               requested_output_names=["OUT"]).exec()
            y = pb_utils.get_output_tensor_by_name(second, "OUT").as_numpy()
            copied = bls.client.copied_bytes
            pb_utils.InferenceRequest(model_name="scale", inputs=[pb_utils.Tensor("IN", y + 0)],
                                      requested_output_names=["OUT"]).exec()  # a new array: copied once
            copies = np.array([copied, bls.client.copied_bytes - copied], dtype=np.int64)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUT", y), pb_utils.Tensor("COPIES", copies)]))
        return responses
'''

_BLS_KEEPS = '''
import threading

import numpy as np
import triton_python_backend_utils as pb_utils
from workers import bls  # edge-kernel's BLS client: the answers it still keeps from the front


class TritonPythonModel:
    """Answers with the previous call's BLS output, kept in self between calls (valid in Triton)."""

    def initialize(self, args):
        self.kept = None

    def execute(self, requests):
        responses = []
        for r in requests:
            kept = np.array([len(bls.client._ended)], dtype=np.int64)  # answers still held for us
            x = pb_utils.get_input_tensor_by_name(r, "IN").as_numpy()
            if x.size and x[0] < 0:  # let go of the kept answer a moment after this call, from another thread
                threading.Timer(0.2, setattr, (self, "kept", None)).start()
                responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUT", x), pb_utils.Tensor("KEPT", kept)]))
                continue
            answer = pb_utils.InferenceRequest(model_name="scale", inputs=[pb_utils.Tensor("IN", x)],
                                               requested_output_names=["OUT"]).exec()
            current = pb_utils.get_output_tensor_by_name(answer, "OUT").as_numpy()[:]  # a view: keeps it too
            previous = self.kept if self.kept is not None else current
            self.kept = current
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUT", previous),
                                                         pb_utils.Tensor("KEPT", kept)]))
        return responses
'''

_BLS_ASYNC = '''
import asyncio
import time

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    async def execute(self, requests):
        responses = []
        for r in requests:
            x = pb_utils.get_input_tensor_by_name(r, "IN").as_numpy()
            calls = [pb_utils.InferenceRequest(model_name=m, inputs=[pb_utils.Tensor("IN", x)],
                                               requested_output_names=["OUT"]).async_exec()
                     for m in ("slow_a", "slow_b")]
            started = time.monotonic()
            a, b = await asyncio.gather(*calls)
            took = np.array([time.monotonic() - started], dtype=np.float32)
            y = pb_utils.get_output_tensor_by_name(a, "OUT").as_numpy() + \\
                pb_utils.get_output_tensor_by_name(b, "OUT").as_numpy()
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUT", y), pb_utils.Tensor("TOOK", took)]))
        return responses
'''

_BLS_DECOUPLED = '''
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for r in requests:
            x = pb_utils.get_input_tensor_by_name(r, "IN").as_numpy()
            got, errors = [], []
            for response in pb_utils.InferenceRequest(model_name="repeat", inputs=[pb_utils.Tensor("IN", x)],
                                                      requested_output_names=["OUT", "IDX"]).exec(decoupled=True):
                if response.has_error():
                    errors.append(response.error().message())
                    continue
                if not response.output_tensors():
                    continue  # the final flag alone
                got.append(int(pb_utils.get_output_tensor_by_name(response, "OUT").as_numpy()[0]))
            responses.append(pb_utils.InferenceResponse([
                pb_utils.Tensor("OUT", np.array(got, dtype=np.int32)),
                pb_utils.Tensor("ERRORS", np.array(errors or [""], dtype=np.object_))]))
        return responses
'''

_BLS_ERRORS = '''
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for r in requests:
            x = pb_utils.get_input_tensor_by_name(r, "IN").as_numpy()
            messages = []
            for model in ("no_such_model", "fails", "crasher"):
                name = "INPUT0" if model == "crasher" else "IN"
                response = pb_utils.InferenceRequest(model_name=model, inputs=[pb_utils.Tensor(name, -x)],
                                                     requested_output_names=[]).exec()
                messages.append(response.error().message() if response.has_error() else "no error")
            wrong = pb_utils.InferenceRequest(model_name="pre", inputs=[pb_utils.Tensor("IN", x.astype(np.int32))],
                                              requested_output_names=["OUT"]).exec()
            messages.append(wrong.error().message() if wrong.has_error() else "no error")
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("ERRORS", np.array(messages, np.object_))]))
        return responses
'''


def build_bls(dest: Path) -> None:
    """Python models that call other models (BLS); the models they call come from :func:`build`."""
    _python(dest, "bls_sync", _io([("IN", "FP32", "-1")], [("OUT", "FP32", "-1"), ("COPIES", "INT64", "2")]),
            _BLS_SYNC)
    _python(dest, "bls_keeps", _io([("IN", "FP32", "-1")], [("OUT", "FP32", "-1"), ("KEPT", "INT64", "1")]),
            _BLS_KEEPS)
    _python(dest, "bls_async", _io([("IN", "FP32", "-1")], [("OUT", "FP32", "-1"), ("TOOK", "FP32", "1")]),
            _BLS_ASYNC)
    arith(dest, "slow_a", "import time; time.sleep(0.4); y = (x * 2).astype(np.float32)")
    arith(dest, "slow_b", "import time; time.sleep(0.4); y = (x + 5).astype(np.float32)")
    _python(dest, "bls_decoupled", _io([("IN", "INT32", "-1")], [("OUT", "INT32", "-1"), ("ERRORS", "STRING", "-1")]),
            _BLS_DECOUPLED)
    _python(dest, "bls_errors", _io([("IN", "FP32", "-1")], [("ERRORS", "STRING", "-1")]), _BLS_ERRORS)
