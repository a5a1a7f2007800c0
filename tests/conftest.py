from __future__ import annotations

import glob
import json
import os
import shutil

import pytest

from .daemon_fixture import Daemon


@pytest.fixture
def make_daemon(tmp_path):
    made: list[Daemon] = []

    def make(models, daemon=None, start=True, env=None) -> Daemon:
        d = Daemon(tmp_path, models, daemon)
        made.append(d)
        return d.start(env=env) if start else d

    yield make
    for d in made:
        d.cleanup()
    shm_leftovers(tmp_path)


def shm_leftovers(tmp_path) -> None:
    """What a test's daemons leave on the shared tmpfs when they end with a model
    checkpointed (its images stay restorable, as in production) or killed: the
    link_remap stashes their manifests name, and named semaphores of dead sims."""
    for manifest in glob.glob(str(tmp_path / "**" / "manifest.json"), recursive=True):
        try:
            stash = json.load(open(manifest)).get("link_remap_stash") or {}
        except (OSError, ValueError):
            continue
        folder = stash.get("dir", "")
        if folder.startswith("/dev/shm/llmux-remap-"):
            shutil.rmtree(folder, ignore_errors=True)
    for sem in glob.glob("/dev/shm/sem.loky-*"):
        pid = sem.split("sem.loky-", 1)[1].split("-", 1)[0]
        if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            try:
                os.unlink(sem)
            except OSError:
                pass
