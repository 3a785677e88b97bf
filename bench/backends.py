"""``python -m bench.backends``: what serving a framework model costs over calling the framework directly.

For each model (a small conv net on ONNX Runtime; a CNN on the PyTorch backend, torchvision's
resnet18 with random weights where torchvision is installed, on the GPU where there is one), in
one run on one machine:

* direct: the framework called as the backend calls it (ONNX Runtime's ``session.run``; torch's
  forward with the input moved to the device and the output back), in a process of its own, as a
  worker is, and timed there;
* in-process: ``kernel.api.Server`` (the input written into an arena buffer, no sockets);
* HTTP + system shared memory: ``tritonclient.http`` against ``kernel start``, the input and
  output in registered POSIX regions (a camera pipeline's path).

Each is called back to back, one at a time, for ``--seconds`` after a warm-up; the page gives
p50/p99 and the overhead (p50 minus the direct call's p50) against the targets: 100 µs in
process, 250 µs over HTTP with shared memory. Results go to ``DIR/backends.json`` and into
docs/performance.md, between the markers of its "Framework backends" section.

Then, for ``--paired`` seconds, the served paths are measured once more in **pairs**: one direct call,
then one served call, alternately, each path in turn; a pair's overhead is its served latency minus the
direct call made just before it, and the page gives the median of those differences. Back to back, the
framework runs warm (on some machines it is 100-160 µs slower after any pause: docs/performance-notes.md,
stop 26) and the worker is still polling when the next request comes. In pairs, every call comes after
the other's work: the framework has cooled, and a worker whose spin window (500 µs) has passed sleeps and
must be woken, as between a camera's frames, which arrive every 16-33 ms. The targets are judged back
to back, as the issue states them; the pairs say what a request after a pause costs, and a drift of the
machine weighs on both halves of a pair alike.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from bench.compare import REPO_ROOT, machine, ours_server, trace_args, triton_server
from bench.inputs import BenchError
from bench.stats import model_stats, server_split
from kernel.cli import backend_setting

# The direct calls run with the settings the backends give their frameworks (workers.backends.pytorch
# sets this before torch loads; ONNX Runtime's options come from the backend itself, below).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

DOCS = os.path.join(REPO_ROOT, "docs", "performance.md")
BEGIN, END = "<!-- bench.backends: begin -->", "<!-- bench.backends: end -->"
TARGETS = {"inprocess": 100.0, "http_shm": 250.0}  # µs of overhead at batch 1
SERVED = ("inprocess", "inprocess_async", "http_shm")


def _samples(call: Callable[[], Any], seconds: float) -> list[int]:
    """Latencies (ns) of ``call`` made back to back for ``seconds``."""
    samples = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t0 = time.perf_counter_ns()
        call()
        samples.append(time.perf_counter_ns() - t0)
    return samples


async def _samples_async(call: Callable[[], Any], seconds: float) -> list[int]:
    """_samples for a coroutine function, on the running loop."""
    samples = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t0 = time.perf_counter_ns()
        await call()
        samples.append(time.perf_counter_ns() - t0)
    return samples


def _summary(samples: list[int]) -> dict[str, float]:
    samples = sorted(samples)
    return {"p50_us": samples[len(samples) // 2] / 1000,
            "p99_us": samples[min(len(samples) - 1, int(len(samples) * 0.99))] / 1000, "calls": len(samples)}


class _Phases:
    """Server-side phase counters summed over the chunks of one path (the statistics extension)."""

    def __init__(self) -> None:
        self.before: dict = {}
        self.total: dict[str, list[int]] = {}
        self.inferences = self.executions = 0

    def start(self, stats: dict) -> None:
        self.before = stats

    def stop(self, stats: dict) -> None:
        for phase, entry in (stats.get("inference_stats") or {}).items():
            old = (self.before.get("inference_stats") or {}).get(phase) or {}
            acc = self.total.setdefault(phase, [0, 0])
            acc[0] += int(entry.get("count", 0) or 0) - int(old.get("count", 0) or 0)
            acc[1] += int(entry.get("ns", 0) or 0) - int(old.get("ns", 0) or 0)

    def split(self) -> dict:
        stats = {"inference_stats": {k: {"count": c, "ns": n} for k, (c, n) in self.total.items()}}
        return server_split({}, stats)


# -- models ----------------------------------------------------------------------------------------

def _onnx_models(repo: str, threads: list[int] | None = None) -> list[dict]:
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    init = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n) for n, s in
            (("w1", (16, 3, 3, 3)), ("b1", (16,)), ("w2", (32, 16, 3, 3)), ("b2", (32,)), ("fc", (32, 10)))]
    nodes = [helper.make_node("Conv", ["INPUT", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Relu", ["c2"], ["r2"]),
             helper.make_node("GlobalAveragePool", ["r2"], ["p"]), helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("MatMul", ["f", "fc"], ["OUTPUT"])]
    graph = helper.make_graph(nodes, "conv", [helper.make_tensor_value_info("INPUT", TensorProto.FLOAT,
                                                                            ["N", 3, 64, 64])],
                              [helper.make_tensor_value_info("OUTPUT", TensorProto.FLOAT, ["N", 10])], init)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = os.path.join(repo, "onnx_conv", "1")
    os.makedirs(path)
    with open(os.path.join(path, "model.onnx"), "wb") as f:
        f.write(model.SerializeToString())
    with open(os.path.join(repo, "onnx_conv", "config.pbtxt"), "w") as f:
        f.write('backend: "onnxruntime"\nmax_batch_size: 8\ninstance_group [ { kind: KIND_CPU } ]\n')

    # The same model with ONNX Runtime's thread pools spinning (its own default; the backend's is off), and
    # with a pool of one thread: a net this small gains nothing from more, and runs on the calling thread
    # with no pool to wake after the pause every served request has (bench.probe_ort).
    variants = {"onnx_conv_spin": ("thread pools spinning", "session.intra_op.allow_spinning", "1"),
                "onnx_conv_1t": ("intra_op_thread_count 1", "intra_op_thread_count", "1"),
                **{f"onnx_conv_{n}t": (f"intra_op_thread_count {n}", "intra_op_thread_count", str(n))
                   for n in threads or () if n != 1}}
    for name, (_, key, value) in variants.items():
        shutil.copytree(os.path.join(repo, "onnx_conv"), os.path.join(repo, name))
        with open(os.path.join(repo, name, "config.pbtxt"), "a") as f:
            f.write(f'parameters {{ key: "{key}" value: {{ string_value: "{value}" }} }}\n')
    base = {"input": "INPUT", "output": "OUTPUT", "shape": [3, 64, 64], "outputs": 10, "batches": [1]}
    direct = {"kind": "onnx", "path": os.path.join(path, "model.onnx"), "input": "INPUT", "output": "OUTPUT"}
    label = "ONNX Runtime, small conv net, CPU"
    return [{**base, "name": "onnx_conv", "label": label, "direct": {**direct, "parameters": {}}},
            *({**base, "name": name, "label": f"{label}, {what}",
               "direct": {**direct, "parameters": {key: {"string_value": value}}}}
              for name, (what, key, value) in variants.items())]


def _SmallCNN() -> Any:  # noqa: N802 - a module class made on demand (torch is imported late)
    import torch

    class SmallCNN(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 16, 3, padding=1)
            self.fc = torch.nn.Linear(16, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))

    torch.manual_seed(0)
    return SmallCNN()


def _torch_model(repo: str, device: str) -> dict:
    import torch

    try:
        import torchvision

        module: Any = torchvision.models.resnet18(weights=None, num_classes=1000)
        label, shape, classes = "resnet18 (torchvision, random weights)", [3, 224, 224], 1000
    except ImportError:  # the dev VM has no torchvision for its torch
        module, label, shape, classes = _SmallCNN(), "small CNN (no torchvision here)", [3, 32, 32], 10
    scripted = torch.jit.script(module.eval())
    path = os.path.join(repo, "torch_cnn", "1")
    os.makedirs(path)
    torch.jit.save(scripted, os.path.join(path, "model.pt"))
    kind = "KIND_GPU" if device == "cuda" else "KIND_CPU"
    with open(os.path.join(repo, "torch_cnn", "config.pbtxt"), "w") as f:
        f.write(f'backend: "pytorch"\nmax_batch_size: 8\ninstance_group [ {{ kind: {kind} }} ]\n'
                f'input [ {{ name: "INPUT__0", data_type: TYPE_FP32, dims: [ {", ".join(map(str, shape))} ] }} ]\n'
                f'output [ {{ name: "OUTPUT__0", data_type: TYPE_FP32, dims: [ {classes} ] }} ]\n')
    return {"name": "torch_cnn", "label": f"PyTorch, {label}, {'GPU' if device == 'cuda' else 'CPU'}",
            "input": "INPUT__0", "output": "OUTPUT__0", "shape": shape, "outputs": classes, "batches": [1, 8],
            "direct": {"kind": "torch", "path": os.path.join(path, "model.pt"), "device": device}}


# -- the direct call, in a process of its own --------------------------------------------------------

def _input(shape: list[int], batch: int) -> np.ndarray:
    """The input every path of one model and batch size is called with."""
    return np.random.default_rng(batch).standard_normal([batch, *shape]).astype(np.float32)


def _direct_call(spec: dict) -> Callable[[np.ndarray], np.ndarray]:
    """The framework called as its backend calls it (ONNX Runtime's ``session.run`` with the session
    options the backend makes of the model's parameters; torch's forward under ``inference_mode`` with the
    input moved to the device and the output brought back, the work the backend must do as well)."""
    if spec["kind"] == "onnx":
        import onnxruntime as ort

        from workers.backend import Model
        from workers.backends.onnxruntime import _options

        options = _options(Model({"name": "direct", "config": {"parameters": spec["parameters"]}}))
        session = ort.InferenceSession(spec["path"], options, providers=["CPUExecutionProvider"])
        return lambda x: session.run([spec["output"]], {spec["input"]: x})[0]
    import torch

    module = torch.jit.load(spec["path"], map_location=spec["device"])
    target = torch.device(spec["device"])

    def call(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(torch.from_numpy(x).to(target)).cpu().numpy()

    return call


def _direct_child(conn: Any, spec: dict, shape: list[int], batch: int) -> None:
    """The direct process: load, warm up, then time calls for as long as asked, until told to stop."""
    try:
        call = _direct_call(spec)
        x = _input(shape, batch)
        for _ in range(20):
            call(x)
    except Exception as e:  # noqa: BLE001 - the parent reports it
        conn.send(f"{type(e).__name__}: {e}")
        return
    conn.send("ready")
    while (seconds := conn.recv()) is not None:
        if seconds == 0:  # one call (a pair's first half)
            t0 = time.perf_counter_ns()
            call(x)
            conn.send(time.perf_counter_ns() - t0)
        else:
            conn.send(_samples(lambda: call(x), seconds))


class _Direct:
    """The model called directly in a process of its own (spawned, as the backend calls it), the way a
    worker calls it: not in the bench process beside the in-process server, the HTTP client and the other
    framework. Called from the bench process, resnet18 moved between 1.2 and 2.5 ms p50 within one run
    while the served forward held at 1.2 ms (stop 23): every overhead it was subtracted from was noise."""

    def __init__(self, m: dict, batch: int) -> None:
        import multiprocessing

        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_direct_child, args=(child, m["direct"], m["shape"], batch),
                                        name=f"direct-{m['name']}", daemon=True)
        self._process.start()
        child.close()
        status = self._conn.recv() if self._conn.poll(300) else "no answer in 300 s"
        if status != "ready":
            self.close()
            raise BenchError(f"the direct call of {m['name']} could not start: {status}")

    def samples(self, seconds: float) -> list[int]:
        """Latencies (ns) of direct calls made back to back for ``seconds``, timed in the direct process."""
        self._conn.send(seconds)
        return self._conn.recv()

    def one(self) -> int:
        """The latency (ns) of one direct call, timed in the direct process."""
        self._conn.send(0)
        return self._conn.recv()

    def close(self) -> None:
        try:
            self._conn.send(None)
        except OSError:
            pass
        self._process.join(10)
        if self._process.is_alive():
            self._process.kill()


# -- measurements ---------------------------------------------------------------------------------

def _http_client(server: Any, model: str, m: dict, x: np.ndarray, out_bytes: int) -> tuple[Any, Callable, Callable]:
    """tritonclient.http with the input and the output in one registered system shared-memory region."""
    import tritonclient.http as httpclient
    import tritonclient.utils.shared_memory as shm

    from shm import dtypes

    client = httpclient.InferenceServerClient(server.url("http"))
    key = f"/bench_{model}_{x.shape[0]}_{os.getpid()}"
    region = shm.create_shared_memory_region(key[1:], key, x.nbytes + out_bytes)
    shm.set_shared_memory_region(region, [x])
    client.register_system_shared_memory(key[1:], key, x.nbytes + out_bytes)
    inp = httpclient.InferInput(m["input"], list(x.shape), dtypes.from_numpy(x.dtype))
    inp.set_shared_memory(key[1:], x.nbytes)
    out = httpclient.InferRequestedOutput(m["output"])
    out.set_shared_memory(key[1:], out_bytes, offset=x.nbytes)

    def close() -> None:
        client.unregister_system_shared_memory(key[1:])
        shm.destroy_shared_memory_region(region)
        client.close()

    return client, lambda: client.infer(model, [inp], outputs=[out]), close


def _measure(m: dict, batch: int, direct: _Direct, server: Any, http_server: Any, seconds: float,
             rounds: int, paired: float) -> dict:
    """The four paths of one model and batch size, interleaved: ``rounds`` rounds of each in turn, so that
    a drift of the machine (a GPU's clocks, a neighbour) weighs on all of them alike; then, for ``paired``
    seconds, the served paths in pairs with a direct call each (_pairs)."""
    import asyncio

    x = _input(m["shape"], batch)
    handle = server.model(m["name"])
    buffer = handle.input_buffer(m["input"], [batch, *m["shape"]])
    buffer[:] = x
    feed = {m["input"]: buffer}

    async def on_loop() -> None:
        (await handle.async_infer(feed)).release()

    async def timed_on_loop() -> int:
        t0 = time.perf_counter_ns()
        await on_loop()
        return time.perf_counter_ns() - t0

    client, http_call, close = _http_client(http_server, m["name"], m, x, batch * m["outputs"] * 4)
    stats = {"inprocess": lambda: model_stats(server.statistics(), m["name"]),
             "inprocess_async": lambda: model_stats(server.statistics(), m["name"]),
             "http_shm": lambda: model_stats(client.get_inference_statistics(m["name"]), m["name"])}
    calls = {"direct": direct.samples, "inprocess": lambda: handle.infer(feed).release(),
             "inprocess_async": None, "http_shm": http_call}
    samples: dict[str, list[int]] = {path: [] for path in calls}
    phases = {path: _Phases() for path in stats}
    chunk = seconds / rounds
    try:
        for path, call in calls.items():  # warm-up (the direct process warmed itself up)
            for _ in range(20 if path != "direct" else 0):
                asyncio.run_coroutine_threadsafe(on_loop(), server._loop).result() if call is None else call()
        for _ in range(rounds):
            for path, call in calls.items():
                if path in phases:
                    phases[path].start(stats[path]())
                if call is None:
                    samples[path] += asyncio.run_coroutine_threadsafe(_samples_async(on_loop, chunk),
                                                                      server._loop).result()
                elif path == "direct":
                    samples[path] += direct.samples(chunk)
                else:
                    samples[path] += _samples(call, chunk)
                if path in phases:
                    phases[path].stop(stats[path]())
        served = {"inprocess": _timed(calls["inprocess"]), "http_shm": _timed(http_call),
                  "inprocess_async": lambda: asyncio.run_coroutine_threadsafe(timed_on_loop(), server._loop).result()}
        pairs = _pairs(direct, served, paired) if paired > 0 else {}
    finally:
        close()
    result = {path: _summary(values) for path, values in samples.items()}
    for path, acc in phases.items():
        result[path]["server"] = acc.split()
        if path in pairs:
            result[path]["paired"] = pairs[path]
    return result


def _timed(call: Callable[[], Any]) -> Callable[[], int]:
    def timed() -> int:
        t0 = time.perf_counter_ns()
        call()
        return time.perf_counter_ns() - t0
    return timed


def _pairs(direct: _Direct, served: dict[str, Callable[[], int]], seconds: float) -> dict[str, dict]:
    """Each served path in pairs, the paths in turn for ``seconds`` in all: one direct call, then one served call
    (each timing itself, in ns). Per path: the medians of its direct calls, of its served calls, and of the pairs'
    differences (the overhead, with the drift of the machine between pairs cancelled)."""
    pairs: dict[str, list[tuple[int, int]]] = {path: [] for path in served}
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        for path, call in served.items():
            d = direct.one()
            pairs[path].append((d, call()))
    result = {}
    for path, values in pairs.items():
        result[path] = {"pairs": len(values), "direct_p50_us": _median([d for d, _ in values]) / 1000,
                        "p50_us": _median([s for _, s in values]) / 1000,
                        "overhead_us": _median([s - d for d, s in values]) / 1000}
    return result


def _median(values: list) -> float:
    """The median (of an even count, the upper of the two middle values, as the starts are chosen)."""
    values = sorted(values)
    return values[len(values) // 2] if values else float("nan")


def _perf_analyzer(m: dict, batch: int, direct: _Direct, http_server: Any, seconds: float) -> dict | None:
    """HTTP + system shared memory once more, with NVIDIA's C++ perf_analyzer as the client (``--shared-memory
    system``, one request at a time), bracketed by direct calls: the served path's cost without the Python
    client's own (tritonclient.http builds and parses its JSON in Python, 100-200 µs a call). None when
    perf_analyzer is not installed or cannot run here (it needs glibc 2.38)."""
    from bench import perf_analyzer as pa

    try:
        binary = pa.find_binary()
    except BenchError:
        return None
    before = _summary(direct.samples(min(seconds, 1.0)))
    spec = pa.PerfAnalyzerRun(model=m["name"], url=http_server.url("http"), batch_size=batch, shared_memory="system",
                              output_shm_size=batch * m["outputs"] * 4, measurement_interval_ms=1000, max_trials=6)
    try:
        result = pa.run(spec, binary)
    except BenchError as e:
        print(f"perf_analyzer: {e}", flush=True)
        return None
    after = _summary(direct.samples(min(seconds, 1.0)))
    latency = result["latency_us"]
    return {"p50_us": latency["p50"], "p99_us": latency.get("p99", latency["p50"]), "stable": result["stable"],
            "direct_p50_us": (before["p50_us"] + after["p50_us"]) / 2, "server": result.get("server")}


FRAME_CONFIG = ('backend: "python"\ninput [ { name: "FRAME", data_type: TYPE_UINT8, dims: [ 1080, 1920, 3 ] } ]\n'
                'output [ { name: "MEAN", data_type: TYPE_FP32, dims: [ 3 ] }, '
                '{ name: "WHERE", data_type: TYPE_STRING, dims: [ 1 ] } ]\n')
FRAME_MODES = {"frame_mapped": "mapped", "frame_staged": "staged"}


def _frame_models(repo: str, triton_repo: str) -> None:
    """The camera-frame python model (tests/templates/frame_gpu_model.py): ours with GPU inputs, mapped and
    staged; Triton's with CPU inputs, which the model moves to the GPU itself (Triton has no GPU tensors in
    python models on JetPack, and its reference build here is CPU-only)."""
    source = os.path.join(REPO_ROOT, "tests", "templates", "frame_gpu_model.py")
    for name, mode in FRAME_MODES.items():
        os.makedirs(os.path.join(repo, name, "1"))
        shutil.copy(source, os.path.join(repo, name, "1", "model.py"))
        with open(os.path.join(repo, name, "config.pbtxt"), "w") as f:
            f.write(FRAME_CONFIG + 'instance_group [ { kind: KIND_GPU, gpus: [ 0 ] } ]\n'
                    'parameters { key: "FORCE_CPU_ONLY_INPUT_TENSORS" value: { string_value: "no" } }\n'
                    f'parameters {{ key: "shared_memory_io" value: {{ string_value: "{mode}" }} }}\n')
    os.makedirs(os.path.join(triton_repo, "frame_gpu", "1"))
    shutil.copy(source, os.path.join(triton_repo, "frame_gpu", "1", "model.py"))
    with open(os.path.join(triton_repo, "frame_gpu", "config.pbtxt"), "w") as f:
        f.write(FRAME_CONFIG + 'instance_group [ { kind: KIND_CPU } ]\n')


def _measure_frame(ours: Any, triton: Any | None, seconds: float, rounds: int) -> dict:
    """A 1080p frame in a client's region to the GPU model and its mean back into the region, over HTTP:
    ours mapped, ours staged, Triton; and the model's GPU work called directly on a numpy frame."""
    import torch

    frame = np.random.default_rng(0).integers(0, 256, (1080, 1920, 3), dtype=np.uint8)
    m = {"input": "FRAME", "output": "MEAN"}

    def direct() -> None:
        torch.from_numpy(frame).cuda().float().mean(dim=(0, 1)).cpu()

    paths: dict[str, tuple[Any, Callable, Callable]] = {}
    for name in FRAME_MODES:
        paths[name] = _http_client(ours, name, m, frame, 12)
    if triton is not None:
        paths["triton"] = _http_client(triton, "frame_gpu", m, frame, 12)
    calls = {"direct": direct, **{name: call for name, (_, call, _) in paths.items()}}
    samples: dict[str, list[int]] = {path: [] for path in calls}
    try:
        for call in calls.values():
            for _ in range(10):
                call()
        for _ in range(rounds):
            for path, call in calls.items():
                samples[path] += _samples(call, seconds / rounds)
    finally:
        for _, _, close in paths.values():
            close()
    return {path: _summary(values) for path, values in samples.items()}


def run(args: argparse.Namespace) -> dict:
    device = args.device
    if device == "auto":
        try:
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        except ImportError:
            device = "cpu"
    from kernel.api import Server

    with tempfile.TemporaryDirectory(prefix="bench-backends-") as tmp:
        repo = os.path.join(tmp, "models")
        os.makedirs(repo)
        models = [*_onnx_models(repo, args.ort_threads), _torch_model(repo, device)]
        if args.only:
            models = [m for m in models if m["name"] in args.only]
        frames = device == "cuda" and not args.only
        triton = None
        if frames:
            triton_repo = os.path.join(tmp, "triton-models")
            _frame_models(repo, triton_repo)
            if args.triton:
                import torch

                os.environ["EDGE_KERNEL_EXTRA_SITE"] = os.path.dirname(os.path.dirname(torch.__file__))
                triton = triton_server(triton_repo, tmp, [])
        rows = []
        frame: dict = {}
        out = os.path.abspath(args.out)
        os.makedirs(out, exist_ok=True)
        trace_file = os.path.join(out, "trace-backends-0.json")  # trace_args' name for it
        inprocess_trace = os.path.join(out, "trace-backends-inprocess.json")
        http_server = ours_server(repo, tmp, trace_args(args.trace, out, "backends", 0)
                                  + [f"--backend-config={b},{k}={v}" if b else f"--backend-config={k}={v}"
                                     for b, k, v in args.backend_config])
        http_server.start()
        try:
            if triton is not None:
                triton.start()
            missing = http_server.wait_ready([m["name"] for m in models] + (list(FRAME_MODES) if frames else []))
            if missing:
                raise BenchError(f"models not ready: {missing}\n{http_server.log_tail()}")
            tracing = {"file": inprocess_trace, "level": ["TIMESTAMPS"], "rate": str(args.trace)} if args.trace \
                else None
            config: dict[str, dict[str, str]] = {}
            for backend, key, value in args.backend_config:
                config.setdefault(backend, {})[key] = value
            runs: list[list[dict]] = []
            for start in range(args.starts):  # a fresh in-process server each time: its placement varies
                with Server(model_repository=repo, trace_config=tracing, backend_config=config) as server:
                    runs.append([])
                    for m in models:
                        for batch in m["batches"]:
                            direct = _Direct(m, batch)
                            try:
                                result = _measure(m, batch, direct, server, http_server, args.seconds, args.rounds,
                                                  args.paired)
                                if batch == 1 and start == 0:
                                    measured = _perf_analyzer(m, batch, direct, http_server, args.seconds)
                                    if measured is not None:
                                        result["http_shm_pa"] = measured
                            finally:
                                direct.close()
                            runs[-1].append({"model": m["label"], "batch": batch, **result})
                            print(f"start {start + 1}: {m['label']}, batch {batch}: " + ", ".join(
                                f"{k} {v['p50_us']:,.0f}" for k, v in result.items()), flush=True)
            rows = _median_starts(runs)
            if frames:
                if triton is not None and triton.wait_ready(["frame_gpu"]):
                    print(f"reference Triton did not load the frame model:\n{triton.log_tail()}", flush=True)
                    frame["triton_error"] = triton.log_tail(8)
                    triton.stop()
                    triton = None
                frame.update(_measure_frame(http_server, triton, args.seconds, args.rounds))
                print("frame: " + ", ".join(f"{k} {v['p50_us']:,.0f}" for k, v in frame.items() if isinstance(v, dict)),
                      flush=True)
        finally:
            http_server.stop()
            if triton is not None:
                triton.stop()
    timelines = {**_timelines(trace_file), **_timelines(inprocess_trace)} if args.trace else {}
    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "command": " ".join(sys.argv),
            "device": device, "seconds": args.seconds, "rounds": args.rounds, "paired": args.paired,
            "machine": machine(None), "rows": rows, "frame": frame, "timelines": timelines}


def _overhead(row: dict, path: str) -> float:
    return row[path]["p50_us"] - row["direct"]["p50_us"]


def _median_starts(runs: list[list[dict]]) -> list[dict]:
    """Per model and batch size, the start whose in-process overhead (``async_infer()``) is the median of
    the starts', with every start's overheads listed (``starts``); perf_analyzer's row, measured on the
    first start only, stays with it. Paired overheads: each start's, and per path their median over the
    starts (``paired_overhead_us``)."""
    rows = []
    for measured in zip(*runs):
        chosen = dict(sorted(measured, key=lambda r: _overhead(r, "inprocess_async"))[len(measured) // 2])
        if "http_shm_pa" in measured[0]:
            chosen["http_shm_pa"] = measured[0]["http_shm_pa"]
        chosen["starts"] = [{path: _overhead(r, path) for path in SERVED}
                            for r in measured]
        paired = [{path: r[path]["paired"]["overhead_us"] for path in SERVED if "paired" in r[path]} for r in measured]
        if all(paired):
            for entry, overheads in zip(chosen["starts"], paired):
                entry["paired"] = overheads
            chosen["paired_overhead_us"] = {path: _median([o[path] for o in paired]) for path in SERVED}
        rows.append(chosen)
    return rows


def _timelines(path: str) -> dict[str, str]:
    """Per model and path (HTTP, in process): where a traced request's time went in the server (bench.timeline's
    table of each event's median µs after the request arrived)."""
    from bench import timeline

    try:
        groups = timeline.offsets(timeline.load([path]))
    except (OSError, ValueError) as e:
        print(f"warning: no trace from {path}: {e}", file=sys.stderr)
        return {}
    return {group: timeline.table({"server": events}) for group, events in sorted(groups.items())}


def render(doc: dict) -> str:
    m = doc["machine"]
    lines = [BEGIN, "## Framework backends: serving overhead over the framework called directly", "",
             f"Generated by `python -m bench.backends` on {doc['date']}; do not edit by hand. Machine: {m['cpu']}, "
             f"{m['usable_cpus']} usable cores, GPU: {m['gpu']}; {m['os']}; Python {m['python'].split()[0]}; "
             f"edge-kernel {m['edge_kernel_commit']}. Each path called back to back, one call at a time, "
             f"{doc['seconds']:g} s in all, in {doc['rounds']} rounds taking the paths in turn (a drift of the "
             "machine weighs on all alike), after a warm-up; latencies in µs, p50 (p99); overhead: p50 minus the "
             "direct call's p50. Targets at "
             f"batch 1: {TARGETS['inprocess']:.0f} µs in process, {TARGETS['http_shm']:.0f} µs over HTTP with system "
             "shared memory.", "",
             "| model | batch | direct | in process: `infer()` from a thread | overhead | `async_infer()` on the "
             "server's loop | overhead | HTTP + system shm | overhead | targets (in process: the better of the two) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for row in doc["rows"]:
        d, i, a, h = row["direct"]["p50_us"], row["inprocess"], row["inprocess_async"], row["http_shm"]
        over_i, over_a, over_h = i["p50_us"] - d, a["p50_us"] - d, h["p50_us"] - d
        verdict = "—"
        if row["batch"] == 1:
            pa_row = row.get("http_shm_pa")
            over_pa = pa_row["p50_us"] - pa_row["direct_p50_us"] if pa_row else None
            ok_i = min(over_i, over_a) <= TARGETS["inprocess"]
            ok_h = (over_pa if over_pa is not None else over_h) <= TARGETS["http_shm"]
            verdict = f"in process {_verdict(ok_i)}, HTTP+shm {_verdict(ok_h)}"
        lines.append(f"| {row['model']} | {row['batch']} | {d:,.0f} | {_lat(i)} | {over_i:,.0f} | {_lat(a)} | "
                     f"{over_a:,.0f} | {_lat(h)} | {over_h:,.0f} | {verdict} |")
    if any(len(row.get("starts", ())) > 1 for row in doc["rows"]):
        lines += ["", f"The in-process server was started {len(doc['rows'][0]['starts'])} times, each start measuring "
                  "every path in full; each row above is the start with the median `async_infer()` overhead. "
                  "Overheads of every start, `infer()` / `async_infer()` / HTTP + shm (Python client), µs:", ""]
        for row in doc["rows"]:
            lines.append(f"- {row['model']}, batch {row['batch']}: " + "; ".join(
                f"{s['inprocess']:,.0f} / {s['inprocess_async']:,.0f} / {s['http_shm']:,.0f}" for s in row["starts"]))
    paired_rows = [row for row in doc["rows"] if row.get("paired_overhead_us")]
    if paired_rows:
        lines += ["", f"**In pairs** ({doc.get('paired', 0):g} s per model and batch size, each start): one "
                  "direct call, then one served call, the paths in turn; a pair's overhead is the served call minus "
                  "the direct call just before it. Every call comes after the other's work: the framework has cooled "
                  "and a worker past its 500 µs spin window sleeps, as between a camera's frames; a drift of the "
                  "machine weighs on both halves of a pair alike (informative: the targets are judged back to "
                  "back). Medians over the pairs of the row's start, µs: direct / served / overhead; the last column "
                  "is the median over the starts of the overheads, `infer()` / `async_infer()` / HTTP + shm (Python "
                  "client):", "",
                  "| model | batch | pairs | `infer()` | `async_infer()` | HTTP + system shm | overhead, median of the "
                  "starts |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for row in paired_rows:
            cells = [row[path].get("paired") for path in SERVED]
            over = row["paired_overhead_us"]
            lines.append(f"| {row['model']} | {row['batch']} | {sum(c['pairs'] for c in cells if c):,} | " + " | ".join(
                f"{c['direct_p50_us']:,.0f} / {c['p50_us']:,.0f} / {c['overhead_us']:,.0f}" if c else "—"
                for c in cells) + " | " + " / ".join(f"{over[path]:,.0f}" for path in SERVED) + " |")
        if any(len(row.get("starts", ())) > 1 for row in paired_rows):
            lines += ["", "Paired overheads of every start, `infer()` / `async_infer()` / HTTP + shm, µs:", ""]
            for row in paired_rows:
                lines.append(f"- {row['model']}, batch {row['batch']}: " + "; ".join(
                    " / ".join(f"{s['paired'][path]:,.0f}" for path in SERVED) for s in row["starts"]))
    pa_rows = [row for row in doc["rows"] if row.get("http_shm_pa")]
    if pa_rows:
        lines += ["", "HTTP + system shared memory with NVIDIA's perf_analyzer as the client (C++, `--shared-memory "
                  "system`, one request at a time, p50 stabilized over 1 s windows), against direct calls made just "
                  "before and after it; where this row exists, the HTTP+shm target above is judged on it (the Python "
                  "client's own JSON and socket work is not the server's):", "",
                  "| model | batch | direct | perf_analyzer p50 (p99) | overhead |",
                  "| --- | ---: | ---: | ---: | ---: |"]
        for row in pa_rows:
            r = row["http_shm_pa"]
            flag = "" if r["stable"] else " (unstable)"
            lines.append(f"| {row['model']} | {row['batch']} | {r['direct_p50_us']:,.0f} | {_lat(r)}{flag} | "
                         f"{r['p50_us'] - r['direct_p50_us']:,.0f} |")
    lines += ["", "Server-side split, µs per request: queued / compute input / compute infer / compute output (the "
              "statistics extension), for `infer()`, `async_infer()` and HTTP:", ""]
    for row in doc["rows"]:
        lines.append(f"- {row['model']}, batch {row['batch']}: {_split(row['inprocess'].get('server'))}; "
                     f"{_split(row['inprocess_async'].get('server'))}; {_split(row['http_shm'].get('server'))}")
    frame = doc.get("frame") or {}
    if frame.get("direct"):
        d = frame["direct"]["p50_us"]
        lines += ["", "A 1080p camera frame (6.2 MB, UINT8) from a client's system shared-memory region to a python "
                  "model that takes its mean colour on the GPU (tests/templates/frame_gpu_model.py), the result "
                  "back into the region, over HTTP, one at a time:", "",
                  "| path | p50 (p99) µs | over the direct call |", "| --- | ---: | ---: |",
                  f"| the model's GPU work called directly on a numpy frame | {_lat(frame['direct'])} | — |"]
        labels = {"frame_mapped": "ours, mapped: the GPU reads the client's pages in place",
                  "frame_staged": "ours, staged: a DMA copy from the page-locked region",
                  "triton": "Triton 2.51 (reference build, CPU inputs; the model copies the frame to the GPU)"}
        for key, label in labels.items():
            if key in frame:
                lines.append(f"| {label} | {_lat(frame[key])} | {frame[key]['p50_us'] - d:+,.0f} |")
        if "triton" in frame and "frame_mapped" in frame:
            lines.append(f"\nMapped p50 / Triton's: {frame['frame_mapped']['p50_us'] / frame['triton']['p50_us']:.2f}; "
                         f"staged / Triton's: {frame['frame_staged']['p50_us'] / frame['triton']['p50_us']:.2f}.")
        elif frame.get("triton_error"):
            lines.append(f"\nThe reference Triton could not serve the frame model: `{frame['triton_error'][-300:]}`")
    lines += ["", "Direct calls, each model in a process of its own (spawned, as a worker is; timed there): ONNX "
              "Runtime's `session.run` on a numpy input, with the session options the backend makes of the row's "
              "model config (spinning and thread counts included); torch's forward under `inference_mode` with the "
              "input moved to the device and the output brought back to a numpy array (the work the backend must do "
              "as well), with "
              "OMP_WAIT_POLICY=PASSIVE as in the backend.", END]
    return "\n".join(lines) + "\n"


def _verdict(ok: bool) -> str:
    return "**pass**" if ok else "**FAIL**"


def _lat(result: dict) -> str:
    return f"{result['p50_us']:,.0f} ({result['p99_us']:,.0f})"


def _split(server: dict | None) -> str:
    if not server:
        return "—"
    return " / ".join(f"{server.get(k, 0):,.0f}" for k in ("queue_us", "compute_input_us", "compute_infer_us",
                                                           "compute_output_us"))


def write_docs(section: str, path: str = DOCS) -> None:
    """Put the section into the page, replacing the one there (``bench compare`` keeps it when it rewrites)."""
    text = open(path, encoding="utf-8").read() if os.path.exists(path) else ""
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + section.rstrip("\n") + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    with open(path, "w", encoding="utf-8") as f:
        f.write(text if text.endswith("\n") else text + "\n")


def kept_section(path: str = DOCS) -> str:
    """The section as the page has it now ("" if none): for ``bench compare``, which rewrites the page."""
    text = open(path, encoding="utf-8").read() if os.path.exists(path) else ""
    if BEGIN in text and END in text:
        return text[text.index(BEGIN):text.index(END) + len(END)] + "\n"
    return ""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.backends", description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=3.0, help="measurement per path and batch size (default 3)")
    p.add_argument("--rounds", type=int, default=6, help="rounds the measurement is spread over (default 6)")
    p.add_argument("--paired", type=float, default=None, metavar="SECONDS",
                   help="then the served paths in pairs with a direct call each, for this long (default: --seconds; "
                        "0: none)")
    p.add_argument("--starts", type=int, default=1,
                   help="in-process servers started one after another, each measured in full; each row is the start "
                        "with the median in-process overhead, every start's listed (default 1)")
    p.add_argument("--triton", action="store_true", help="also run the frame model on the reference Triton "
                                                         "(scripts/reference-triton; GPU machines only)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where the PyTorch model runs")
    p.add_argument("--only", nargs="+", default=[], metavar="MODEL",
                   help="only these models (onnx_conv, onnx_conv_spin, onnx_conv_1t, onnx_conv_<N>t, "
                        "torch_cnn), and no frames")
    p.add_argument("--ort-threads", type=int, nargs="+", default=[], metavar="N",
                   help="the conv net once more with intra_op_thread_count N, for each N given")
    p.add_argument("--backend-config", action="append", type=backend_setting, default=[], metavar="BACKEND,KEY=VALUE",
                   help="a --backend-config of both servers measured (repeatable), e.g. python,front-poll-us=0")
    p.add_argument("--out", default=os.path.join(REPO_ROOT, "bench", "results", "tmp"), help="folder for the JSON")
    p.add_argument("--no-docs", action="store_true", help="leave docs/performance.md as it is")
    p.add_argument("--trace", type=int, default=0, metavar="N",
                   help="trace one request in N, over HTTP and in process (--trace-config), and print where their time "
                        "went in the server, per model (bench.timeline); latencies then include tracing, so docs/ is "
                        "left alone")
    args = p.parse_args(argv)
    if args.starts < 1:
        p.error("--starts must be at least 1")
    if args.paired is None:
        args.paired = args.seconds
    if args.trace or args.backend_config:  # not the servers' defaults: docs/ keeps what they measure
        args.no_docs = True
    doc = run(args)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "backends.json"), "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=2, default=str)
    section = render(doc)
    print(section)
    for group, text in doc["timelines"].items():
        print(f"\n### Traced: {group}\n\n{text}")
    if not args.no_docs:
        write_docs(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
