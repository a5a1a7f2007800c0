from __future__ import annotations

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
