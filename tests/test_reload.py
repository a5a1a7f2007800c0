"""Catalog edits apply at once, as a diff; a broken edit changes nothing."""

from __future__ import annotations

import os
import time

from .daemon_fixture import free_port, wait_for


def model_toml(name: str, port: int, **extra) -> str:
    lines = [f"\n[models.{name}]", f'model = "org/{name}"', f"port = {port}"]
    lines += [f"{k} = {v!r}".replace("'", '"') for k, v in extra.items()]
    return "\n".join(lines) + "\n"


def test_drop_in_written_or_renamed_into_place_is_applied(make_daemon):
    d = make_daemon({"a": {}}, start=False)
    (d.tmp / "models.d").mkdir()
    d.start()
    (d.tmp / "models.d" / "x.toml").write_text(model_toml("x", free_port()))
    wait_for(lambda: "x" in d.status()["models"], timeout=5, what="x to appear")
    assert d.state("x") == "stopped"
    # An editor's save: write a temp file, rename it over the catalog.
    tmp = d.tmp / ".llmux.toml.swp"
    tmp.write_text(d.config.read_text() + model_toml("y", free_port()))
    os.rename(tmp, d.config)
    wait_for(lambda: "y" in d.status()["models"], timeout=5, what="y to appear")
    assert d.swap("y")["ok"]


def test_broken_edit_changes_nothing_and_the_error_clears_when_fixed(make_daemon):
    d = make_daemon({"a": {}, "b": {}})
    assert d.swap("a")["ok"]
    pid = d.status()["models"]["a"]["pid"]
    good = d.config.read_text()
    d.config.write_text(good.replace('model = "org/b"', 'model = "org/b"\nport_typo = 1'))
    wait_for(lambda: d.status()["config"]["error"], timeout=5, what="the error")
    err = d.status()["config"]["error"]
    line = good.replace('model = "org/b"', 'model = "org/b"\nport_typo = 1').splitlines().index(
        "port_typo = 1") + 1
    assert f"{d.config}:{line}: models.b.port_typo: unknown key" in err
    assert d.status()["models"]["a"]["pid"] == pid and d.state("a") == "active"
    assert d.swap("b")["ok"]  # the last good catalog is in force
    assert d.daemon_log().count("catalog not reloaded") == 1  # said once, not per event
    d.config.write_text(good)
    wait_for(lambda: d.status()["config"]["error"] is None, timeout=5, what="the error to clear")


def test_diff_removed_changed_and_unchanged_models(make_daemon):
    d = make_daemon({"a": {}, "b": {}, "c": {}, "gone": {}})
    assert d.swap("b")["ok"] and d.swap("a")["ok"]  # b sleeps, a active
    pids = {n: m["pid"] for n, m in d.status()["models"].items()}
    text = d.config.read_text()
    # remove `gone` (stopped) and the active `a`; change sleeping `b`; keep `c`.
    blocks = text.split("\n[models.")
    keep = [blk for blk in blocks if not blk.startswith(("gone]", "a]"))]
    new = "\n[models.".join(keep).replace('model = "org/b"', 'model = "org/b"\nargs = ["--served-model-name", "bee"]')
    d.config.write_text(new)
    wait_for(lambda: "gone" not in d.status()["models"], timeout=5, what="gone removed")
    st = d.status()["models"]
    assert st["a"]["state"] == "active" and st["a"]["removal_pending"] is True
    assert st["a"]["pid"] == pids["a"]  # the active model keeps running
    assert st["b"]["restart_pending"] is True and st["b"]["pid"] == pids["b"]
    assert "removal pending" in d.ctl("status").stdout
    # Swapping to the changed sleeping model restarts it rather than waking it stale.
    assert d.swap("b")["ok"]
    st = d.status()["models"]
    assert st["b"]["pid"] != pids["b"] and not st["b"].get("restart_pending")
    assert d.sim("b")["model"] in ("bee", "org/b")
    wait_for(lambda: "a" not in d.status()["models"], timeout=10, what="a removed once asleep")


def test_changed_active_model_restart_pending_until_restart(make_daemon):
    d = make_daemon({"a": {}})
    assert d.swap("a")["ok"]
    pid = d.status()["models"]["a"]["pid"]
    d.config.write_text(d.config.read_text().replace('model = "org/a"',
                                                     'model = "org/a"\nargs = ["--max-model-len", "77"]'))
    wait_for(lambda: d.status()["models"]["a"].get("restart_pending"), timeout=5, what="pending")
    assert d.status()["models"]["a"]["pid"] == pid
    r = d.ctl("restart")
    assert r.returncode == 0, r.stderr
    st = d.status()["models"]["a"]
    assert st["state"] == "active" and st["pid"] != pid and not st.get("restart_pending")
    assert "77" in open(f"/proc/{st['pid']}/cmdline").read()


def test_daemon_wide_settings_that_cannot_change_live_are_reported(make_daemon):
    d = make_daemon({"a": {}})
    d.config.write_text(d.config.read_text().replace(d.socket, d.socket + ".new"))
    r = d.ctl("reload")
    assert r.returncode == 0
    assert "not applied until llmuxd restarts: daemon.socket" in r.stdout or \
        "not applied until llmuxd restarts: daemon.socket" in d.daemon_log()
    assert d.status()["ok"]  # still on the old socket


def test_sighup_reloads(make_daemon):
    import signal
    d = make_daemon({"a": {}})
    d.watcher_off = True
    text = d.config.read_text() + model_toml("h", free_port())
    d.config.write_text(text)
    d.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "h" in d.status()["models"], timeout=5, what="h after HUP")
    time.sleep(0.1)
    assert d.status()["config"]["error"] is None


def configmap_update(volume, files: dict[str, str]) -> None:
    """What the kubelet's AtomicWriter does to a ConfigMap volume: the files go into a
    new hidden `..TIMESTAMP` directory, a `..data_tmp` link to it is renamed over
    `..data`, each key is a link `NAME -> ..data/NAME` (made once), the old directory
    is removed. The key files themselves never change."""
    import shutil
    old = os.readlink(volume / "..data") if (volume / "..data").is_symlink() else None
    stamp = volume / f"..{time.strftime('%Y_%m_%d_%H_%M_%S')}.{time.monotonic_ns()}"
    for rel, text in files.items():
        (stamp / rel).parent.mkdir(parents=True, exist_ok=True)
        (stamp / rel).write_text(text)
    os.symlink(stamp.name, volume / "..data_tmp")
    os.rename(volume / "..data_tmp", volume / "..data")
    for top in {rel.split("/")[0] for rel in files}:
        if not (volume / top).is_symlink():
            os.symlink(f"..data/{top}", volume / top)
    if old:
        shutil.rmtree(volume / old)


def test_watcher_sees_a_configmap_update():
    import tempfile
    import threading
    from pathlib import Path

    from llmuxd.watch import CatalogWatcher
    with tempfile.TemporaryDirectory() as tmp:
        volume = Path(tmp)
        configmap_update(volume, {"llmux.toml": "# one\n"})
        woken = threading.Event()
        w = CatalogWatcher(str(volume / "llmux.toml"), woken.set)
        assert w.link_hops() == {str(volume / "..data"),
                                 str(volume / os.readlink(volume / "..data"))}
        w.start()
        try:
            time.sleep(1.5)  # the watch is live (and its first timeout has passed)
            w.changed.clear()
            woken.clear()
            configmap_update(volume, {"llmux.toml": "# two\n"})
            assert woken.wait(5) and w.changed.is_set(), "the ..data swap was not seen"
        finally:
            w.stop()


def test_configmap_volume_catalog_hot_reloads(make_daemon):
    """llmuxd on a Kubernetes ConfigMap volume (packaging/kubernetes/): an edit of the
    ConfigMap, a main-file key or a models.d/ item, is applied like any other edit."""
    d = make_daemon({"a": {}}, start=False)
    volume = d.tmp / "configmap"
    volume.mkdir()
    main = d.config.read_text()
    configmap_update(volume, {"llmux.toml": main, "models.d/x.toml": model_toml("x", free_port())})
    d.config = volume / "llmux.toml"
    d.start()
    assert set(d.status()["models"]) == {"a", "x"}
    configmap_update(volume, {"llmux.toml": main + model_toml("y", free_port()),
                              "models.d/x.toml": model_toml("x", free_port())})
    wait_for(lambda: "y" in d.status()["models"], timeout=5, what="y from the ConfigMap update")
    configmap_update(volume, {"llmux.toml": main + model_toml("y", free_port()),
                              "models.d/z.toml": model_toml("z", free_port())})
    wait_for(lambda: set(d.status()["models"]) == {"a", "y", "z"}, timeout=5,
             what="models.d/z.toml in, x.toml out, from the second update")
    assert d.status()["config"]["error"] is None
    assert d.swap("z")["ok"]


def test_watcher_thread_has_ended_when_stop_returns(tmp_path):
    """No watchfiles thread may outlive the loop into the interpreter's teardown (a
    clean shutdown ended in SIGSEGV on Python 3.12 with the thread still in watch())."""
    import threading

    from llmuxd.watch import CatalogWatcher
    (tmp_path / "llmux.toml").write_text("# x\n")
    w = CatalogWatcher(str(tmp_path / "llmux.toml"), lambda: None)
    w.start()
    time.sleep(0.3)  # inside watchfiles.watch()
    t0 = time.monotonic()
    assert w.stop() is True
    assert time.monotonic() - t0 < 5
    assert not [t for t in threading.enumerate() if t.name == "catalog-watcher"]
