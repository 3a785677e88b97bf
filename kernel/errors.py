"""Errors with Triton's status codes, mapped to HTTP and gRPC statuses."""

from __future__ import annotations

# Triton's TRITONSERVER_Error_Code names -> HTTP status, as tritonserver 2.51 answers
# (docs/triton-behaviour.md: a duplicate region name is ALREADY_EXISTS and answers 400).
HTTP_STATUS = {
    "UNKNOWN": 500,
    "INTERNAL": 500,
    "NOT_FOUND": 404,
    "INVALID_ARG": 400,
    "UNAVAILABLE": 503,
    "UNSUPPORTED": 400,
    "ALREADY_EXISTS": 400,
    "CANCELLED": 500,
}

# How Triton's Status prints each code in front of a message (model reasons).
REASON_PREFIX = {
    "UNKNOWN": "Unknown",
    "INTERNAL": "Internal",
    "NOT_FOUND": "Not found",
    "INVALID_ARG": "Invalid argument",
    "UNAVAILABLE": "Unavailable",
    "UNSUPPORTED": "Unsupported",
    "ALREADY_EXISTS": "Already exists",
    "CANCELLED": "Cancelled",
}

# ... -> grpc.StatusCode numbers (grpclib.const.Status values).
GRPC_STATUS = {
    "UNKNOWN": 2,
    "INTERNAL": 13,
    "NOT_FOUND": 5,
    "INVALID_ARG": 3,
    "UNAVAILABLE": 14,
    "UNSUPPORTED": 12,
    "ALREADY_EXISTS": 6,
    "CANCELLED": 1,
}


class ServerError(Exception):
    """An error reported to a client: Triton's message text and status code."""

    def __init__(self, message: str, code: str = "INVALID_ARG", http_status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self._http = http_status

    @property
    def http_status(self) -> int:
        return self._http or HTTP_STATUS.get(self.code, 500)

    @property
    def grpc_status(self) -> int:
        return GRPC_STATUS.get(self.code, 2)

    def reason(self) -> str:
        """The message as Triton states a model's failure (``Internal: ...``)."""
        return f"{REASON_PREFIX.get(self.code, 'Unknown')}: {self.message}"

    def __repr__(self) -> str:
        return f"ServerError({self.message!r}, {self.code!r})"


def invalid(message: str) -> ServerError:
    return ServerError(message, "INVALID_ARG")


def not_found(message: str) -> ServerError:
    return ServerError(message, "NOT_FOUND")


def unavailable(message: str) -> ServerError:
    return ServerError(message, "UNAVAILABLE")


def internal(message: str) -> ServerError:
    return ServerError(message, "INTERNAL")


def unsupported(message: str) -> ServerError:
    return ServerError(message, "UNSUPPORTED")


#: CUDA IPC does not exist on Jetson: like Triton built without CUDA, no CUDA region can be registered.
CUDA_SHM_UNSUPPORTED = ("failed to register shared memory region: CUDA shared memory is not supported by this "
                        "server (CUDA IPC is unavailable on Jetson); use system shared memory")
