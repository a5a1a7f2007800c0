"""Image bookkeeping of level 4: manifests, partial dumps, our own link_remap files only."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest

from llmuxd import checkpoint_io as cio


def fake_daemon(images_dir):
    ck = SimpleNamespace(images_dir=str(images_dir), cuda_plugin_dir="/nonexistent")
    import subprocess
    return SimpleNamespace(catalog=SimpleNamespace(daemon=SimpleNamespace(checkpoint=ck)),
                           runtimes={}, run_in_background=lambda argv: subprocess.run(argv))


def test_prepare_removes_only_link_remaps_our_last_dump_recorded(tmp_path):
    d = fake_daemon(tmp_path)
    ours, theirs = "/dev/shm/link_remap.llmuxtest-ours", "/dev/shm/link_remap.llmuxtest-theirs"
    for path in (ours, theirs):
        open(path, "w").close()
    try:
        (tmp_path / "a").mkdir()
        (tmp_path / "a" / "manifest.json").write_text(json.dumps(
            {"pids": [1], "root_pid": 1, "link_remap": [ours, "/etc/passwd"]}))
        (tmp_path / "a.partial-old").mkdir()
        fresh = cio.prepare_images(d, "a")
        assert not os.path.exists(ours) and os.path.exists(theirs)
        assert os.path.exists("/etc/passwd")  # never outside /dev/shm
        assert not [p for p in tmp_path.iterdir() if p.name.startswith("a.partial-old")]
        assert os.path.isdir(fresh) and os.listdir(fresh) == []
    finally:
        for path in (ours, theirs):
            if os.path.exists(path):
                os.unlink(path)


def test_commit_is_a_rename_with_a_manifest_and_replaces_older_images(tmp_path):
    d = fake_daemon(tmp_path)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "old.img").write_bytes(b"x")
    tmp = cio.prepare_images(d, "a")
    with open(os.path.join(tmp, "core-1.img"), "wb") as f:
        f.write(b"\0" * 1000)
    result = cio.commit_images(d, "a", tmp, {"model": "a", "pids": [1], "root_pid": 1})
    assert result == {"path": str(tmp_path / "a"), "bytes": 1000}
    manifest = cio.read_manifest(d, result["path"])
    assert manifest["bytes"] == 1000 and manifest["time"] > 0
    assert not (tmp_path / "a" / "old.img").exists() and not os.path.exists(tmp)


@pytest.mark.parametrize("content,message", [
    (None, "manifest missing"), ("{not json", "corrupt manifest"), ('{"pids": "x"}', "corrupt"),
])
def test_bad_manifests_are_refused_with_a_reason(tmp_path, content, message):
    (tmp_path / "a").mkdir()
    if content is not None:
        (tmp_path / "a" / "manifest.json").write_text(content)
    with pytest.raises(ValueError, match=message):
        cio.read_manifest(fake_daemon(tmp_path), str(tmp_path / "a"))


def test_set_aside_keeps_failed_images_for_diagnosis(tmp_path):
    (tmp_path / "a").mkdir()
    aside = cio.set_aside(fake_daemon(tmp_path), str(tmp_path / "a"))
    assert ".failed-" in aside and os.path.isdir(aside) and not (tmp_path / "a").exists()
