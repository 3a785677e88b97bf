"""``--model-control-mode=poll``: Triton's repository polling.

At start every model loads, as in mode ``none``. Then every ``--repository-poll-secs`` seconds the
repositories are scanned again: a new model directory loads, a model whose files changed reloads (the
version that serves keeps serving until the new one is ready, and keeps serving if it fails), and a
model whose directory went away unloads, with the ensembles that use it. As in Triton, a model that
failed to load is tried again at every poll until it loads.

A model's files are compared by a fingerprint: the path, size and modification time of every file
under its directory (``__pycache__`` left out: the python backend writing bytecode there is no change
of the model; Triton reloads every python model once for it). Triton compares only the newest
modification time, so a file replaced by an older one goes unnoticed there; here it reloads.

The scan (one ``stat`` per file) runs in a thread, so a large repository never holds the event loop;
the loads themselves are the explicit-mode loads (kernel.server.Core._load). Polls never overlap: the
next is timed from the end of the last, on the loop's timer, and nothing runs between them.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import TYPE_CHECKING

from kernel.model_config_pb2 import ModelConfig
from kernel.pipelines.ensemble import composing_models

if TYPE_CHECKING:
    from kernel.server import Core

log = logging.getLogger("kernel")

#: a model's files: (path under the model directory, modification time in ns, size), sorted; None where
#: the directory could not be read (counted as unchanged, as Triton counts it)
Fingerprint = tuple | None

_SKIPPED = frozenset({"__pycache__"})


def fingerprint(model_dir: str) -> Fingerprint:
    """What :class:`Poller` compares to see whether a model's files changed (symbolic links followed, as
    Triton follows them: a Kubernetes ConfigMap swapped under the model counts as a change)."""
    entries: list[tuple[str, int, int]] = []
    seen: set[tuple[int, int]] = set()
    pending = [(model_dir, "")]
    while pending:
        directory, rel = pending.pop()
        try:
            with os.scandir(directory) as it:
                children = list(it)
        except OSError:
            if not rel:
                return None
            continue
        for entry in children:
            if entry.name in _SKIPPED:
                continue
            path = f"{rel}/{entry.name}" if rel else entry.name
            try:
                st = entry.stat()  # follows links
                is_dir = entry.is_dir()
            except OSError:
                continue  # gone meanwhile, or a dangling link
            if is_dir:
                if (st.st_dev, st.st_ino) not in seen:  # a link loop is walked once
                    seen.add((st.st_dev, st.st_ino))
                    entries.append((path + "/", 0, 0))  # its mtime moves when __pycache__ appears: not kept
                    pending.append((entry.path, path))
            else:
                entries.append((path, st.st_mtime_ns, st.st_size))
    return tuple(sorted(entries))


def scan(core: Core) -> tuple[dict[str, str], dict[str, str], dict[str, Fingerprint]]:
    """The repositories' models, their errors (a name in several repositories) and each model's
    fingerprint (in a thread: see :class:`Poller`)."""
    found, errors = core.repository.scan()
    return found, errors, {name: fingerprint(path) for name, path in found.items()}


class Poller:
    """Rescans the repositories every ``interval`` seconds and applies the changes to ``core``."""

    def __init__(self, core: Core, interval: float) -> None:
        self.core = core
        self.interval = interval
        #: the fingerprint each model last loaded from; a model that failed to load has none (tried again)
        self.loaded: dict[str, Fingerprint] = {}
        #: ensembles unloaded because a model they use went away: loaded again once one of those loads
        self.orphans: set[str] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task | None = None
        self._stopped = False

    async def scan(self) -> tuple[dict[str, str], dict[str, str], dict[str, Fingerprint]]:
        return await asyncio.get_running_loop().run_in_executor(None, scan, self.core)

    def start(self, loaded: dict[str, Fingerprint]) -> None:
        """Begin polling; ``loaded``: the models that loaded at start, with their fingerprints taken before."""
        self.loaded = dict(loaded)
        if self.interval > 0:  # 0: load at start only, as tritonserver --repository-poll-secs=0
            self._arm()

    def _arm(self) -> None:
        if not self._stopped:
            self._timer = asyncio.get_running_loop().call_later(self.interval, self._fire)

    def _fire(self) -> None:
        self._timer = None
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        try:
            await self.poll()
        except Exception:  # noqa: BLE001 - a poll must never end the polling
            log.exception("failed to poll model repository")
        finally:
            self._task = None
            self._arm()

    async def poll(self) -> None:
        """One rescan: unload the models that went away, then (re)load the new and changed ones, ensembles last."""
        core = self.core
        found, errors, prints = await self.scan()
        for name in sorted(errors):
            log.error("failed to poll model '%s': not unique across all model repositories", name)
        for name in sorted(n for n in list(core.models) if n not in found and core.present(n)):
            self.loaded.pop(name, None)
            self.orphans.discard(name)
            self.orphans.update(await core.remove_model(name))
        changed = [name for name, fp in prints.items()
                   if fp is not None and (name not in self.loaded or self.loaded[name] != fp)]
        changed += [name for name in sorted(self.orphans - set(changed)) if name in found
                    and set(composing_models(core._repository_config(name) or ModelConfig())) & set(changed)]
        if not changed:
            return
        ensembles = {name for name in changed if core._is_ensemble(name)}
        for group in ([n for n in changed if n not in ensembles], [n for n in changed if n in ensembles]):
            outcomes = await asyncio.gather(*(core._load_locked(name) for name in group), return_exceptions=True)
            for name, outcome in zip(group, outcomes):
                if outcome is None:
                    self.loaded[name] = prints[name]
                    self.orphans.discard(name)
                    log.info("successfully loaded '%s'", name)
                elif not isinstance(outcome, Exception):
                    raise outcome  # cancelled: the server is stopping

    async def stop(self, timeout: float) -> None:
        """No more polls; a poll under way finishes (its loads are waited for up to ``timeout`` seconds)."""
        self._stopped = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        task = self._task
        if task is not None:
            await asyncio.wait([task], timeout=timeout)
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
