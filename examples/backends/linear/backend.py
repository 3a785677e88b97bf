"""A complete backend: a linear layer (Y = X @ W + b) whose weights are a model's ``model.npz``.

Serve it with ``kernel start --backend-directory examples/backends`` and a model whose
config says ``backend: "linear"`` (docs/backends.md walks through it).
"""

import os

import numpy as np

from workers.backend import Backend as Base
from workers.backend import BackendError, Model, Request, Response, batch_input, batch_sizes, split


class Backend(Base):
    default_model_filename = "model.npz"

    @staticmethod
    def _weights(model: Model) -> tuple[np.ndarray, np.ndarray]:
        if not os.path.isfile(model.artifact):
            raise BackendError(f"unable to find '{model.artifact}' for model '{model.name}'", "UNAVAILABLE")
        with np.load(model.artifact) as npz:
            return npz["W"].astype(np.float32), npz["b"].astype(np.float32)

    @classmethod
    def auto_complete_config(cls, model: Model) -> dict | None:
        """Inputs and outputs from the weights' shapes; batching up to 8 requests."""
        config = dict(model.config)
        weights, _ = cls._weights(model)
        config.setdefault("max_batch_size", 0)
        if not config["max_batch_size"]:
            config["max_batch_size"] = 8
            config.setdefault("dynamic_batching", {})
        if not config.get("input"):
            config["input"] = [{"name": "X", "data_type": "TYPE_FP32", "dims": [weights.shape[0]]}]
        if not config.get("output"):
            config["output"] = [{"name": "Y", "data_type": "TYPE_FP32", "dims": [weights.shape[1]]}]
        return config

    def __init__(self, model: Model) -> None:
        super().__init__(model)
        if model.kind == "GPU":
            raise BackendError("the linear backend runs on the CPU only: use KIND_CPU", "INVALID_ARG")
        self.weights, self.bias = self._weights(model)
        self.scale = float(model.backend_config.get("scale", "1"))  # --backend-config=linear,scale=2

    def execute(self, requests: list[Request]) -> list[Response]:
        sizes = batch_sizes(requests, batched=True)
        x = batch_input(requests, "X")  # the whole batch: a view on shared memory, no copy
        self.mark()  # inputs gathered
        y = (x @ self.weights + self.bias) * self.scale
        self.mark()  # inference done
        return [Response({"Y": rows}) for rows in split(y, sizes)]
