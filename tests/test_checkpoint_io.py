"""Image bookkeeping of level 4: manifests, partial dumps, our own link_remap files only."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest

from llmuxd import checkpoint_io as cio, link_remap


def fake_daemon(images_dir):
    ck = SimpleNamespace(images_dir=str(images_dir), cuda_plugin_dir="/nonexistent")
    import subprocess
    return SimpleNamespace(catalog=SimpleNamespace(daemon=SimpleNamespace(checkpoint=ck)),
                           runtimes={}, run_in_background=lambda argv: subprocess.run(argv))


def images_naming(folder, *names):
    """A files.img that names /dev/shm/NAME as CRIU writes it: a length byte, the path."""
    os.makedirs(folder, exist_ok=True)
    blob = b"".join(b"\x12" + bytes([len(p)]) + p for p in (f"/dev/shm/{n}".encode() for n in names))
    with open(os.path.join(folder, "files.img"), "wb") as f:
        f.write(blob)


def test_link_remaps_of_a_dump_are_stashed_and_put_back_and_nothing_else_moves(tmp_path):
    d = fake_daemon(tmp_path)
    before_dump = link_remap.link_remaps(d)
    ours, theirs = "/dev/shm/link_remap.990001", "/dev/shm/link_remap.990002"
    for path in (ours, theirs):
        open(path, "w").close()
    stash = None
    try:
        images_naming(tmp_path / "img", "link_remap.990001")  # the dump names only ours
        stash = link_remap.stash_link_remaps(d, "a", before_dump, str(tmp_path / "img"))
        assert not os.path.exists(ours) and os.path.exists(theirs)
        assert oct(os.stat(stash["dir"]).st_mode & 0o777) == "0o700"
        assert link_remap.unstash_link_remaps(d, stash) == [ours] and os.path.exists(ours)
        link_remap.clear_link_remaps(d, stash, drop=False)      # a failed restore: the stash stays
        assert not os.path.exists(ours) and os.listdir(stash["dir"]) == ["link_remap.990001"]
        open(ours, "w").close()                          # someone else took the name meanwhile
        with pytest.raises(ValueError, match="exists and is not this checkpoint's"):
            link_remap.unstash_link_remaps(d, stash)
        os.unlink(ours)
        link_remap.unstash_link_remaps(d, stash)
        link_remap.clear_link_remaps(d, stash, drop=True)       # a good restore: everything goes
        assert not os.path.exists(stash["dir"]) and not os.path.exists(ours)
        assert os.path.exists(theirs)
    finally:
        for path in (ours, theirs):
            if os.path.exists(path):
                os.unlink(path)
        if stash and os.path.isdir(stash["dir"]):
            import shutil
            shutil.rmtree(stash["dir"])


def test_a_planted_stash_folder_is_refused(tmp_path):
    d = fake_daemon(tmp_path)
    with pytest.raises(ValueError, match="bad link_remap stash"):
        link_remap.unstash_link_remaps(d, {"dir": "/etc", "files": [["passwd", 0, 0]]})
    folder = "/dev/shm/llmux-remap-x-planted"
    os.makedirs(folder, exist_ok=True)
    os.chmod(folder, 0o777)
    try:
        with pytest.raises(ValueError, match="not llmuxd's private folder"):
            link_remap.unstash_link_remaps(d, {"dir": folder, "files": []})
    finally:
        os.rmdir(folder)


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
