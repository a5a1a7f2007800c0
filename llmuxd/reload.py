"""Catalog reloads: a new catalog is applied as a diff, so that an edit never touches a
model it does not change, and a removed model goes only once it has no process left.

A mixin of Daemon (daemon.py). A broken edit keeps the last good catalog in force
(config_error says why); keys that cannot change while llmuxd runs (its socket, its
directories, the front's address) are reported as pending a restart, never half
applied.
"""

from __future__ import annotations

import dataclasses
import logging

from . import states as S
from .access import Access
from .catalog import Catalog, CatalogError, load_catalog
from .claims import model_claim
from .swap import stop_plan

log = logging.getLogger("llmuxd.daemon")


def same_definition(a, b) -> bool:
    """Equal but for where they were written (an edit above moves every line)."""
    return dataclasses.replace(a, source="") == dataclasses.replace(b, source="")


class CatalogReload:
    def reload(self) -> tuple[bool, str]:
        self.notifier.reloading()
        try:
            new = load_catalog(self.config_path)
        except CatalogError as exc:
            if self.config_error != str(exc):
                log.error("catalog not reloaded, the last good one stays in force:\n%s", exc)
            self.config_error = str(exc)
            self.notifier.send("READY=1", f"STATUS=reload failed: {str(exc).splitlines()[0]}")
            return False, str(exc)
        message = self.apply_catalog(new)
        self.config_error = None
        self.notifier.ready(self.status_line())
        return True, message

    def apply_catalog(self, new: Catalog) -> str:
        """Apply a new catalog as a diff: unchanged models are not touched at all."""
        old = self.catalog
        notes = []
        models = dict(new.models)
        for name in old.models.keys() - new.models.keys():
            rt = self.runtimes[name]
            busy = any(job.model == name for job in self.jobs)  # a plan is using it
            if rt.state in (S.STOPPED, S.FAILED) and not busy:
                del self.runtimes[name]
                notes.append(f"removed {name}")
            else:  # still has a process or images: keep its definition until it is stopped
                models[name] = old.models[name]
                rt.extra["removal_pending"] = True
                notes.append(f"{name} will be removed once stopped")
        for name in new.models.keys() - old.models.keys():
            if name in self.runtimes:  # removal pending, and now it is back
                self.runtimes[name].extra.pop("removal_pending", None)
                self.runtimes[name].extra["restart_pending"] = True
            else:
                self.runtimes[name] = S.Runtime(name)
            notes.append(f"added {name}")
        for name in new.models.keys() & old.models.keys():
            rt = self.runtimes[name]
            rt.extra.pop("removal_pending", None)
            if same_definition(new.models[name], old.models[name]):
                continue
            if rt.state in S.HAS_PROCESS or rt.state == S.CHECKPOINTED:
                rt.extra["restart_pending"] = True
                notes.append(f"{name} changed: restart pending (applies at its next start)")
            else:
                notes.append(f"{name} changed")
        fixed = [k for k in ("socket", "socket_mode", "socket_group", "state_dir", "log_dir",
                             "max_clients", "client_timeout", "metrics_listen")
                 if getattr(new.daemon, k) != getattr(old.daemon, k)]
        daemon = new.daemon
        if new.daemon.front.listen != old.daemon.front.listen:
            fixed.append("front.listen")
            daemon = dataclasses.replace(daemon, front=dataclasses.replace(
                new.daemon.front, listen=old.daemon.front.listen, host=old.daemon.front.host,
                port=old.daemon.front.port))
        if fixed:
            notes.append(f"not applied until llmuxd restarts: daemon.{', daemon.'.join(fixed)}")
            daemon = dataclasses.replace(daemon, **{k: getattr(old.daemon, k) for k in fixed
                                                    if "." not in k})
        self.catalog = dataclasses.replace(new, daemon=daemon, models=models)
        self.access = Access(daemon, strict=False)
        for note in notes:
            log.info("reload: %s", note)
        self.save_state()
        return "; ".join(notes) or "no changes"

    def _forget(self, name: str) -> None:
        rt = self.runtimes.get(name)
        if rt is None or rt.state not in (S.STOPPED, S.FAILED):
            return
        del self.runtimes[name]
        self.specs_in_use.pop(name, None)
        models = {k: v for k, v in self.catalog.models.items() if k != name}
        self.catalog = dataclasses.replace(self.catalog, models=models)
        log.info("%s removed from the catalog", name)
        self.save_state()

    def remove_pending(self) -> None:
        """Models removed from the catalog while they had a process: forget those now
        stopped, stop one that is asleep at last. Jobs on other GPUs do not hold it up;
        one that may use the model (its GPUs, its name) does."""
        for name, rt in list(self.runtimes.items()):
            if not rt.extra.get("removal_pending") or any(j.model == name for j in self.jobs):
                continue
            if rt.state in (S.STOPPED, S.FAILED):
                self._forget(name)
            elif rt.state in S.ASLEEP:  # swapped away at last: now it can go
                claim = model_claim(self, name)
                if self.runner.conflicting(claim) is None:
                    self.start_job("remove", name, stop_plan(self, name), claim=claim,
                                   on_done=lambda job, name=name: self._forget(name))
