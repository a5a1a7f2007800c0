"""The seccomp rule of checkpointable models: io_uring fails with ENOSYS.

CRIU cannot dump an io_uring instance, and vLLM's API server holds one
(uvloop's bundled libuv ignores UV_USE_IO_URING=0). A seccomp filter that makes
io_uring_setup/enter/register fail with ENOSYS makes libuv fall back to epoll,
as on a kernel without io_uring. The filter is installed by the one spawn
function in the child right before exec (no wrapper process stays in the
tree), is inherited by every process of the tree, and CRIU dumps and restores
it with the tree.

The filter checks the architecture field first: a syscall number means
nothing without its ABI. Every ABI a machine can run natively is listed
(x86_64 also runs i386 and x32 code), and anything else is allowed: the filter
never breaks a program, it only takes io_uring away. A machine whose syscall
table we do not know gets no filter (and `llmuxd --check` says so).
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct

# Since Linux 5.1 new syscalls share one number on every architecture
# (include/uapi/asm-generic/unistd.h): io_uring_setup 425, enter 426, register 427.
IO_URING = (425, 426, 427)
X32_BIT = 0x40000000

# AUDIT_ARCH_* (include/uapi/linux/audit.h) -> the io_uring syscall numbers of that ABI.
_ABIS = {
    "x86_64": {0xC000003E: IO_URING + tuple(n | X32_BIT for n in IO_URING),  # x86_64 and x32
               0x40000003: IO_URING},                                        # i386
    "aarch64": {0xC00000B7: IO_URING, 0x40000028: IO_URING},                 # arm64, arm
    "ppc64le": {0xC0000015: IO_URING},
    "s390x": {0x80000016: IO_URING},
    "riscv64": {0xC00000F3: IO_URING},
}

# classic BPF and seccomp constants (linux/filter.h, linux/seccomp.h)
_LD_W_ABS = 0x20
_JEQ_K = 0x15
_RET_K = 0x06
_OFF_NR, _OFF_ARCH = 0, 4
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_ERRNO = 0x00050000
PR_SET_NO_NEW_PRIVS = 38
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2


def supported(machine: str | None = None) -> bool:
    return (machine or os.uname().machine) in _ABIS


def program(machine: str | None = None) -> list[tuple[int, int, int, int]]:
    """The filter as (code, jt, jf, k) instructions; ValueError for an unknown machine."""
    machine = machine or os.uname().machine
    if machine not in _ABIS:
        raise ValueError(f"no io_uring syscall table for architecture {machine}")
    insns: list[tuple[int, int, int, int]] = []
    blocks = list(_ABIS[machine].items())
    # Each block: load arch; if not this ABI skip the block; load nr; one JEQ per
    # syscall, jumping to the final ERRNO; allow. The ERRNO return is last, so
    # each JEQ's distance is computed once the whole program is laid out.
    fixups = []
    for arch, numbers in blocks:
        insns.append((_LD_W_ABS, 0, 0, _OFF_ARCH))
        insns.append((_JEQ_K, 0, len(numbers) + 2, arch))
        insns.append((_LD_W_ABS, 0, 0, _OFF_NR))
        for nr in numbers:
            fixups.append(len(insns))
            insns.append((_JEQ_K, 0, 0, nr))
        insns.append((_RET_K, 0, 0, SECCOMP_RET_ALLOW))
    insns.append((_RET_K, 0, 0, SECCOMP_RET_ALLOW))  # an ABI we do not know: leave it be
    errno_at = len(insns)
    insns.append((_RET_K, 0, 0, SECCOMP_RET_ERRNO | errno.ENOSYS))
    for i in fixups:
        code, _, jf, k = insns[i]
        distance = errno_at - i - 1
        if distance > 255:
            raise ValueError("seccomp program too long for an 8-bit jump")
        insns[i] = (code, distance, jf, k)
    return insns


def encode(insns) -> bytes:
    """struct sock_filter[]: u16 code, u8 jt, u8 jf, u32 k."""
    return b"".join(struct.pack("=HBBI", *insn) for insn in insns)


class Installer:
    """Prepared in the parent, called in the child between fork and exec.

    Everything that allocates (the program, the ctypes call objects) is made
    here, so the child only makes two or three prctl calls.
    """

    def __init__(self, machine: str | None = None) -> None:
        insns = program(machine)
        self._buf = ctypes.create_string_buffer(encode(insns))

        class SockFprog(ctypes.Structure):
            _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

        self._fprog = SockFprog(len(insns), ctypes.addressof(self._buf))
        libc = ctypes.CDLL(None, use_errno=True)
        self._prctl = libc.prctl
        self._prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong,
                                ctypes.c_ulong]
        self._prctl.restype = ctypes.c_int
        self._fprog_ptr = ctypes.cast(ctypes.pointer(self._fprog), ctypes.c_void_p)

    def __call__(self) -> None:
        """Install the filter in this process; raises OSError (the spawn then fails)."""
        if self._prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, self._fprog_ptr, 0, 0) == 0:
            return
        err = ctypes.get_errno()
        if err != errno.EACCES:
            raise OSError(err, f"seccomp filter: {os.strerror(err)}")
        # Without CAP_SYS_ADMIN the kernel demands no_new_privs first. Root does not
        # need it, and we leave setuid programs of the model's tree working then.
        if self._prctl(PR_SET_NO_NEW_PRIVS, 1, None, 0, 0) != 0 or \
                self._prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, self._fprog_ptr, 0, 0) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"seccomp filter: {os.strerror(err)}")


def io_uring_disabled() -> int | None:
    """kernel.io_uring_disabled (Linux 6.6+): 0 allowed, 1 privileged only, 2 off; None: absent."""
    try:
        with open("/proc/sys/kernel/io_uring_disabled") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def filtered(pid: int | str = "self") -> int:
    """How many seccomp filters a process runs under (the `Seccomp_filters` line), 0 if none."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Seccomp_filters:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0
