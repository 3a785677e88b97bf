"""A python model's own Python environment: Triton's ``EXECUTION_ENV_PATH`` parameter.

Triton lets a python model bring its dependencies: ``parameters { key: "EXECUTION_ENV_PATH" value:
{ string_value: "$$TRITON_MODEL_DIRECTORY/env.tar.gz" } }`` names a conda-pack archive (or an unpacked
environment directory) with ``bin/activate``; the model's stub then runs in it. Here the model's workers
run on that environment's interpreter (``bin/python3``), with the variables ``bin/activate`` would set
(VIRTUAL_ENV, PATH and LD_LIBRARY_PATH led by the environment's, no PYTHONHOME), so its packages are the
ones the model imports.

The worker itself needs this server's code (put first on PYTHONPATH, as always) and a few packages
(numpy, msgpack, posix_ipc) that the environment may lack. Those come from this server's own
site-packages, appended *after* the environment's (``EK_FALLBACK_PATH``, read by workers/__main__.py):
the environment's versions win, ours fill the gaps. Compiled packages only load into the Python version
they were built for, so the environment must run this server's Python version (major.minor); Triton has
the same rule, its stub being built for one Python version. A mismatch is the model's UNAVAILABLE reason.

Archives are extracted once per server, as Triton's python backend does (under one temporary directory,
removed when the server exits), and again, into a new directory, if the archive's modification time
changes (a reload after the file was replaced). Extraction runs in a thread: a large environment never
holds the event loop.
"""

from __future__ import annotations

import atexit
import itertools
import os
import shutil
import site
import subprocess
import sys
import tarfile
import tempfile
import threading

from kernel.errors import ServerError

PARAMETER = "EXECUTION_ENV_PATH"
#: Triton's placeholder for the model's directory in the parameter's value
MODEL_DIRECTORY = "$$TRITON_MODEL_DIRECTORY"

_lock = threading.Lock()
_base: str | None = None  # this server's extraction directory (made on first use)
_extracted: dict[str, tuple[str, int]] = {}  # archive's real path -> (its directory, mtime ns when extracted)
_versions: dict[str, str] = {}  # interpreter -> its "major.minor"
_count = itertools.count()


def environment(parameter: str, model_dir: str,
                base: dict[str, str] | None = None) -> tuple[str, dict[str, str | None]]:
    """The interpreter and the environment variables of the workers of a model whose EXECUTION_ENV_PATH is
    ``parameter`` (a blocking call: it may extract an archive; None: a variable to remove), on top of ``base``
    (the worker's other variables). Raises ServerError with the reason."""
    path = parameter.replace(MODEL_DIRECTORY, model_dir)
    real = os.path.realpath(path)
    if not os.path.exists(real):
        raise ServerError(f"Failed to get the canonical path for {path}.", "INTERNAL")
    root = real if os.path.isdir(real) else _extract(real)
    activate = os.path.join(root, "bin", "activate")
    if not os.path.isfile(activate):
        raise ServerError(f"Path {activate} does not exist. The Python environment should contain an 'activate' "
                          "script.", "INTERNAL")
    python = next((p for p in (os.path.join(root, "bin", n) for n in ("python3", "python")) if os.path.isfile(p)),
                  None)
    if python is None:
        raise ServerError(f"the Python environment {path} has no bin/python3", "INTERNAL")
    ours = f"{sys.version_info.major}.{sys.version_info.minor}"
    theirs = _version(python)
    if theirs != ours:
        raise ServerError(f"the Python environment {path} runs Python {theirs}, but this server's workers need "
                          f"Python {ours} (the server's own): build the environment with Python {ours}", "INTERNAL")
    current = {**os.environ, **(base or {})}
    env = {"VIRTUAL_ENV": root, "PATH": os.pathsep.join(p for p in (os.path.join(root, "bin"),
                                                                     current.get("PATH", "")) if p),
           "LD_LIBRARY_PATH": os.pathsep.join(p for p in (os.path.join(root, "lib"),
                                                          current.get("LD_LIBRARY_PATH", "")) if p),
           "EK_FALLBACK_PATH": os.pathsep.join(_our_packages()), "PYTHONHOME": None}
    return python, env


def _extract(archive: str) -> str:
    """The directory ``archive`` is unpacked in, unpacking it if it is new or changed since."""
    global _base
    mtime = os.stat(archive).st_mtime_ns
    with _lock:
        known = _extracted.get(archive)
        if known is not None and known[1] == mtime:
            return known[0]
        if _base is None:
            _base = tempfile.mkdtemp(prefix="python_env_")
            atexit.register(shutil.rmtree, _base, True)
        # A changed archive goes to a new directory: the version still serving runs from the old one (removed
        # at exit with the rest), where Triton extracts over it.
        target = os.path.join(_base, str(next(_count)))
        os.makedirs(target)
        try:
            with tarfile.open(archive) as tar:  # (gzip, bzip2, xz or plain: tarfile tells them apart)
                if hasattr(tarfile, "tar_filter"):  # (3.10.12+: no member may land outside the target)
                    tar.extractall(target, filter="tar")
                else:
                    tar.extractall(target)
        except (tarfile.TarError, OSError, EOFError) as e:
            shutil.rmtree(target, ignore_errors=True)
            raise ServerError(f"Failed to extract the Python environment {archive}: {e}", "INTERNAL") from None
        _extracted[archive] = (target, mtime)
        return target


def _version(python: str) -> str:
    version = _versions.get(python)
    if version is None:
        try:
            out = subprocess.run([python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                                 capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONHOME": ""})
            version = out.stdout.strip() or f"unknown ({out.stderr.strip()[-200:]})"
        except (OSError, subprocess.SubprocessError) as e:
            version = f"unknown ({e})"
        _versions[python] = version
    return version


def _our_packages() -> list[str]:
    """This server's site-packages (the worker's fallbacks for packages the environment lacks)."""
    paths = list(site.getsitepackages())
    if site.ENABLE_USER_SITE and os.path.isdir(site.getusersitepackages()):
        paths.append(site.getusersitepackages())
    return [p for p in dict.fromkeys(paths) if os.path.isdir(p)]
