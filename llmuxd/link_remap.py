"""The link_remap stash of level 4: CRIU's /dev/shm/link_remap.N files, kept per checkpoint.

Why this exists: vLLM (joblib/loky) holds a named POSIX semaphore that is never
unlinked, so `criu dump --link-remap` leaves a /dev/shm/link_remap.N hard link for
the restore to find. N is a per-dump file id that repeats between the dumps of two
trees: while one model is checkpointed, the next model's dump fails ("Can't link
remap ... File exists"). README, "Levels 3 and 4", and tests/test_level4.py
(two level-4 models checkpointed at once, in any order) hold the full story.

Right after a dump we move this dump's files into a private folder on the same
tmpfs (rename: no copy, same inode) and put them back just before this model's
restore. Files are known by (name, device, inode), so nothing that is not ours is
ever moved or removed. Apart from checkpoint_io.py (image folders and manifests)
because /dev/shm is shared with every other process on the host, and everything
here is about not touching their files; checkpoint_io calls in only to drop a
stash with its images. Like checkpoint_io, each operation is named so plans can
ask for it (OPERATIONS), runs on the loop thread and raises OSError/ValueError.
"""

from __future__ import annotations

import glob
import logging
import os
import stat
import tempfile
import time

log = logging.getLogger(__name__)
SHM = "/dev/shm"


def link_remaps(d) -> list[str]:
    """Every link_remap file in /dev/shm now, whoever made it."""
    return sorted(glob.glob(os.path.join(SHM, "link_remap.*")))


def named_link_remaps(images: str) -> set[str]:
    """The /dev/shm/link_remap.N names the images of a dump refer to. CRIU writes the
    path as a protobuf string in files.img (reg-files.img before 4.0): a length byte,
    then the bytes, which is how the name is told from whatever follows it."""
    prefix = os.path.join(SHM, "link_remap.").encode()
    names = set()
    for img in ("files.img", "reg-files.img", "remap-fpath.img"):
        try:
            with open(os.path.join(images, img), "rb") as f:
                data = f.read(64 << 20)
        except OSError:
            continue
        at = data.find(prefix)
        while at > 0:
            length = data[at - 1]
            path = data[at:at + length]
            if length > len(prefix) and path[len(prefix):].isdigit():
                names.add(os.path.basename(path.decode()))
            at = data.find(prefix, at + 1)
    return names


def stash_link_remaps(d, name: str, before: list[str], images: str) -> dict | None:
    """Move the link_remap files this dump created (named by its images, and new since
    the dump began) into a fresh private folder."""
    named = named_link_remaps(images)
    new = sorted(p for p in set(link_remaps(d)) - set(before) if os.path.basename(p) in named)
    if not new:
        return None
    folder = tempfile.mkdtemp(prefix=f"llmux-remap-{name}-", dir=SHM)  # 0700, O_EXCL
    files = []
    for path in new:
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode):
            continue  # not a file CRIU made (a planted link or FIFO): leave it alone
        os.rename(path, os.path.join(folder, os.path.basename(path)))
        files.append([os.path.basename(path), st.st_dev, st.st_ino])
    return {"dir": folder, "files": files}


def _checked_stash(stash: dict) -> str:
    folder = stash.get("dir") if isinstance(stash, dict) else None
    if not isinstance(folder, str) or os.path.dirname(folder) != SHM or \
            not os.path.basename(folder).startswith("llmux-remap-"):
        raise ValueError(f"bad link_remap stash in the manifest: {stash!r}")
    st = os.lstat(folder)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise ValueError(f"{folder} is not llmuxd's private folder; not used")
    return folder


def _ours(path: str, dev: int, ino: int) -> bool:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    return stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) == (dev, ino)


def unstash_link_remaps(d, stash: dict | None) -> list[str]:
    """Hard-link the stashed files back to /dev/shm for a restore (the stash keeps its
    copy, so a failed restore can be retried). A name taken by someone else's file
    fails the restore: never replace a file that is not ours."""
    if not stash:
        return []
    folder = _checked_stash(stash)
    placed = []
    try:
        for base, dev, ino in stash["files"]:
            src, dst = os.path.join(folder, base), os.path.join(SHM, base)
            if not _ours(src, dev, ino):
                raise ValueError(f"stashed {src} is missing or changed")
            if _ours(dst, dev, ino):
                continue  # already back (a retried restore)
            try:
                os.link(src, dst)
            except FileExistsError:
                raise ValueError(f"{dst} exists and is not this checkpoint's; restore "
                                 "later, or remove it if no other CRIU image needs it") from None
            placed.append(dst)
    except BaseException:
        for dst in placed:
            os.unlink(dst)
        raise
    return placed


def clear_link_remaps(d, stash: dict | None, drop: bool) -> None:
    """After a restore: no link_remap file of ours stays in /dev/shm (CRIU removes
    them on success, not always on failure); with `drop`, the stash goes too."""
    if not stash:
        return
    for base, dev, ino in stash.get("files", []):
        dst = os.path.join(SHM, base)
        if _ours(dst, dev, ino):
            os.unlink(dst)
    if drop:
        drop_stash(stash)


def drop_stash(stash: dict) -> None:
    """Remove a stash folder and the files in it that are still ours."""
    try:
        folder = _checked_stash(stash)
    except (ValueError, OSError):
        return
    for base, dev, ino in stash.get("files", []):
        path = os.path.join(folder, base)
        if _ours(path, dev, ino):
            os.unlink(path)
    try:
        os.rmdir(folder)
    except OSError as exc:
        log.warning("cannot remove %s: %s", folder, exc.strerror)


def clear_partial_link_remaps(images: str) -> None:
    """A dump cut short by llmuxd's death (CRIU finished, we never stashed) left its
    link_remap files in /dev/shm, where they would break every later dump that picks
    the same N. Ours are those the partial images name whose link was made while that
    dump ran: from the folder's start time (its name) to its newest file."""
    try:
        started = time.mktime(time.strptime(images.rsplit(".partial-", 1)[1][:15],
                                            "%Y%m%d-%H%M%S"))
        ended = max(os.lstat(os.path.join(images, f)).st_mtime for f in os.listdir(images))
    except (ValueError, OSError):
        return
    for base in named_link_remaps(images):
        path = os.path.join(SHM, base)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue
        if stat.S_ISREG(st.st_mode) and started - 1 <= st.st_ctime <= ended + 5:
            log.info("removing %s, left by an interrupted dump (%s)", path, images)
            os.unlink(path)


def forget_link_remaps(d, paths: list[str]) -> None:
    """Manifests of llmux 0.1 listed their link_remap paths: unlink those, in /dev/shm only."""
    for path in paths:
        if os.path.dirname(path) == SHM and os.path.basename(path).startswith("link_remap."):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass


OPERATIONS = {f.__name__: f for f in (
    link_remaps, forget_link_remaps, stash_link_remaps, unstash_link_remaps, clear_link_remaps)}
