"""Model repositories on disk: Triton's layout, version policies, duplicates."""

from __future__ import annotations

import os
import shutil
import tempfile

from kernel.errors import ServerError
from kernel.model_config_pb2 import ModelConfig
from shm.region import owner_token, stale_entries

#: Directories of models loaded from files sent with the request: ``<tmp>/ek-model-<pid>.<start>-<random>``
OVERRIDE_PREFIX = "ek-model-"


class Repository:
    """One or more repository directories, searched in order."""

    def __init__(self, paths: list[str]) -> None:
        self.paths = [os.path.abspath(p) for p in paths]

    def check(self) -> None:
        for path in self.paths:
            if not os.path.isdir(path):
                raise ServerError(f"failed to stat file {path}", "INTERNAL")

    def scan(self) -> tuple[dict[str, str], dict[str, str]]:
        """``({model: directory}, {model: error})`` over every repository."""
        found: dict[str, str] = {}
        errors: dict[str, str] = {}
        for repo in self.paths:
            try:
                entries = sorted(os.listdir(repo))
            except OSError:
                continue
            for entry in entries:
                path = os.path.join(repo, entry)
                if entry.startswith(".") or not os.path.isdir(path):
                    continue
                if entry in found:
                    errors[entry] = f"model '{entry}' exists in multiple model repositories"
                    continue
                found[entry] = path
        for name in errors:
            found.pop(name, None)
        return found, errors

    def locate(self, name: str) -> str:
        found, errors = self.scan()
        if name in errors:
            raise ServerError(errors[name], "INVALID_ARG")
        if name not in found:
            raise ServerError(f"failed to load '{name}', failed to poll from model repository", "INTERNAL")
        return found[name]


def write_override(name: str, files: dict[str, bytes]) -> str:
    """Write the files a load request sent (``{"file:<path>": content}``) into a private model directory
    named ``name`` and return it (its parent, a fresh temporary directory, is the server's to remove).

    As Triton's: each path is joined under the model directory and normalised, and one that ends outside it
    (``file:../../x/model.py``) fails the load; an absolute path stays under the directory too. The directory
    is new and only this function writes in it, so no link can redirect a write. Blocking: run in a thread.
    """
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise ServerError(f"Invalid model name '{name}' for model file override", "INVALID_ARG")
    root = tempfile.mkdtemp(prefix=f"{OVERRIDE_PREFIX}{owner_token()}-")
    model_dir = os.path.join(root, name)
    try:
        os.mkdir(model_dir)
        for key, data in files.items():
            target = os.path.normpath(model_dir + "/" + key[len("file:"):])
            if not target.startswith(model_dir + os.sep) or "\0" in target:
                raise ServerError(f"Invalid file parameter '{key}' with normalized path '{target}' must stay "
                                  "within model directory.", "INVALID_ARG")
            try:
                os.makedirs(os.path.dirname(target), exist_ok=True)
                with open(target, "xb") as f:
                    f.write(data)
            except OSError as e:
                raise ServerError(f"failed to write file parameter '{key}': {e.strerror}", "INVALID_ARG") from None
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    return model_dir


def remove_stale_overrides(tmp: str | None = None) -> list[str]:
    """Remove the file-loaded model directories of servers that ended without removing them (killed, or
    crashed): those whose owner, by the pid and start time in their name, no longer runs."""
    tmp = tmp or tempfile.gettempdir()
    removed = []
    for entry in stale_entries(tmp, _override_owner):
        path = os.path.join(tmp, entry)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _override_owner(entry: str) -> tuple[int, int] | None:
    if not entry.startswith(OVERRIDE_PREFIX):
        return None
    pid, _, start = entry[len(OVERRIDE_PREFIX):].partition("-")[0].partition(".")
    return (int(pid), int(start)) if pid.isdigit() and start.isdigit() else None  # (older names: left alone)


def available_versions(model_dir: str) -> list[int]:
    """Numeric version subdirectories, ascending."""
    versions = []
    for entry in os.listdir(model_dir):
        if entry.isdigit() and os.path.isdir(os.path.join(model_dir, entry)):
            versions.append(int(entry))
    return sorted(versions)


def select_versions(config: ModelConfig, model_dir: str) -> list[int]:
    """The versions the config's version policy asks for (Triton's rules)."""
    versions = available_versions(model_dir)
    policy = config.version_policy
    choice = policy.WhichOneof("policy_choice")
    if choice == "all":
        chosen = versions
    elif choice == "specific":
        chosen = [v for v in policy.specific.versions]
        missing = [v for v in chosen if v not in versions]
        if missing:
            raise ServerError(f"version {missing[0]} is specified for model '{config.name}', but the version "
                              "directory is not present", "NOT_FOUND")
    else:
        count = policy.latest.num_versions or 1
        chosen = versions[-count:]
    if not chosen:
        raise ServerError(f"at least one version must be available under the version policy of model "
                          f"'{config.name}'", "INVALID_ARG")
    return sorted(chosen)
