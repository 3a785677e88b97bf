"""Model repositories on disk: Triton's layout, version policies, duplicates."""

from __future__ import annotations

import os

from kernel.errors import ServerError
from kernel.model_config_pb2 import ModelConfig


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
