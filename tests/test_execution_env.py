"""A python model's own Python environment (Triton's ``EXECUTION_ENV_PATH``), served through tritonclient: a
virtual environment made here with a package only it has, given as a directory and as an archive under
``$$TRITON_MODEL_DIRECTORY``; the model imports that package and reports the interpreter's prefix. Broken
environments make the model UNAVAILABLE with the reason, and the other models serve."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import sysconfig
import tarfile
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.support import python_model, serving

PROBE = '''
import sys
import numpy as np
import ekenvprobe
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        out = np.array([ekenvprobe.VALUE.encode(), sys.prefix.encode(), np.__file__.encode()], dtype=np.object_)
        return [pb_utils.InferenceResponse([pb_utils.Tensor("OUT", out)]) for _ in requests]
'''

IO = ('input [ { name: "IN", data_type: TYPE_INT32, dims: [ 1 ] } ]\n'
      'output [ { name: "OUT", data_type: TYPE_STRING, dims: [ 3 ] } ]\n')


def _env(repo: Path, name: str) -> str:
    """``parameters`` naming an execution environment."""
    return f'parameters {{ key: "EXECUTION_ENV_PATH" value: {{ string_value: "{name}" }} }}\n'


def _venv(path: Path, value: str) -> Path:
    """A virtual environment of this interpreter's Python, holding the package ``ekenvprobe``."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    purelib = sysconfig.get_path("purelib", vars={"base": str(path), "platbase": str(path)})
    package = Path(purelib) / "ekenvprobe"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(f"VALUE = {value!r}\n")
    return path


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("env_repo")
    envs = tmp_path_factory.mktemp("envs")
    python_model(repo, "in_dir", PROBE, IO + _env(repo, str(_venv(envs / "plain", "from a directory"))))
    python_model(repo, "in_archive", PROBE, IO + _env(repo, "$$TRITON_MODEL_DIRECTORY/env.tar.gz"))
    packed = _venv(envs / "packed", "from an archive")
    with tarfile.open(repo / "in_archive" / "env.tar.gz", "w:gz") as tar:
        tar.add(packed, arcname=".")
    python_model(repo, "no_env", PROBE, IO + _env(repo, "$$TRITON_MODEL_DIRECTORY/missing.tar.gz"))
    no_activate = _venv(envs / "no_activate", "x")
    (no_activate / "bin" / "activate").unlink()
    python_model(repo, "no_activate", PROBE, IO + _env(repo, str(no_activate)))
    other = _venv(envs / "other_python", "x")  # an interpreter of another Python version (a stand-in)
    (other / "bin" / "python3").unlink()
    (other / "bin" / "python3").write_text("#!/bin/sh\necho 3.99\n")
    (other / "bin" / "python3").chmod(stat.S_IRWXU)
    python_model(repo, "other_python", PROBE, IO + _env(repo, str(other)))
    python_model(repo, "without", PROBE.replace("import ekenvprobe\n", "").replace("ekenvprobe.VALUE", "'-'"), IO)
    return repo


@pytest.fixture(scope="module")
def server(repo: Path, tmp_path_factory: pytest.TempPathFactory):
    yield from serving(repo, tmp_path_factory.mktemp("env_log"), "--strict-readiness", "false")


def _infer(server, model: str) -> list[str]:
    client = httpclient.InferenceServerClient(server.http_url)
    try:
        inp = httpclient.InferInput("IN", [1], "INT32")
        inp.set_data_from_numpy(np.zeros(1, np.int32))
        return [v.decode() for v in client.infer(model, [inp]).as_numpy("OUT")]
    finally:
        client.close()


@pytest.mark.parametrize("model, value", [("in_dir", "from a directory"), ("in_archive", "from an archive")])
def test_the_model_runs_in_its_environment(server, model: str, value: str) -> None:
    """The package only the environment has is imported; the interpreter is the environment's (its prefix);
    numpy, which the environment lacks, comes from the server's own packages."""
    got, prefix, numpy_file = _infer(server, model)
    assert got == value
    assert prefix != sys.prefix and os.path.isfile(os.path.join(prefix, "bin", "activate"))
    assert numpy_file == np.__file__


def test_the_archive_is_extracted_outside_the_repository(server, repo: Path) -> None:
    _, prefix, _ = _infer(server, "in_archive")
    assert not Path(prefix).is_relative_to(repo)
    assert Path(prefix).name.isdigit() and Path(prefix).parent.name.startswith("python_env_")


def test_a_model_without_one_is_untouched(server) -> None:
    assert _infer(server, "without")[1] == sys.prefix


@pytest.mark.parametrize("model, reason", [
    ("no_env", "Failed to get the canonical path for {repo}/no_env/missing.tar.gz."),
    ("no_activate", "/bin/activate does not exist. The Python environment should contain an 'activate' script."),
    ("other_python", "runs Python 3.99, but this server's workers need Python "
                     f"{sys.version_info.major}.{sys.version_info.minor}"),
])
def test_a_broken_environment_is_the_models_reason(server, repo: Path, model: str, reason: str) -> None:
    client = httpclient.InferenceServerClient(server.http_url)
    try:
        index = {m["name"]: m for m in client.get_model_repository_index()}
        with pytest.raises(InferenceServerException):
            client.infer(model, [httpclient.InferInput("IN", [1], "INT32").set_data_from_numpy(np.zeros(1, np.int32))])
    finally:
        client.close()
    assert index[model]["state"] == "UNAVAILABLE"
    assert reason.format(repo=repo) in index[model]["reason"]


def test_a_changed_archive_is_extracted_anew(tmp_path: Path) -> None:
    """The same archive is extracted once; a replaced one into a new directory, the old one left for the version
    still serving from it."""
    from kernel import execution_env

    archive = tmp_path / "model" / "env.tar.gz"
    archive.parent.mkdir()
    for value in ("first", "second"):
        with tarfile.open(archive, "w:gz") as tar:
            tar.add(_venv(tmp_path / value, value), arcname=".")
        os.utime(archive, ns=(0, {"first": 1, "second": 2}[value] * 10**18))
        first = execution_env.environment("$$TRITON_MODEL_DIRECTORY/env.tar.gz", str(archive.parent))
        again = execution_env.environment("$$TRITON_MODEL_DIRECTORY/env.tar.gz", str(archive.parent))
        assert first == again
        root = Path(first[1]["VIRTUAL_ENV"])
        assert list(root.rglob("ekenvprobe/__init__.py"))[0].read_text() == f"VALUE = {value!r}\n"
        if value == "first":
            old = root
    assert root != old and old.is_dir()
