"""A seccomp filter for bubblewrap's `--seccomp FD`, compiled here to classic BPF with `struct` (no dependency).

    program = seccomp_filter()     # bytes: an array of struct sock_filter, or None off x86_64

It denies (EPERM) the system calls a sandboxed program has no use for and that widen the kernel's attack surface:
namespaces and mounts, ptrace and cross-process memory, keyrings, bpf, perf, userfaultfd, io_uring, modules,
kexec, reboot, swap, clock setting and the like; `clone` with any CLONE_NEW* flag; `clone3` answers ENOSYS so
glibc falls back to `clone`, whose flags the filter can read (clone3 passes them in memory, out of BPF's reach).
Any other architecture than x86_64 (an x32 call included) is killed. Only x86_64 numbers are here: elsewhere the
filter is absent and the run's layers say so.
"""

from __future__ import annotations

import errno
import platform
import struct

_AUDIT_ARCH_X86_64 = 0xC000003E
_X32_BIT = 0x40000000
# x86_64 numbers (asm/unistd_64.h)
_DENIED = {
    "ptrace": 101, "syslog": 103, "personality": 135, "uselib": 134, "modify_ldt": 154, "pivot_root": 155,
    "adjtimex": 159, "chroot": 161, "acct": 163, "settimeofday": 164, "mount": 165, "umount2": 166, "swapon": 167,
    "swapoff": 168, "reboot": 169, "sethostname": 170, "setdomainname": 171, "iopl": 172, "ioperm": 173,
    "init_module": 175, "delete_module": 176, "quotactl": 179, "nfsservctl": 180, "lookup_dcookie": 212,
    "clock_settime": 227, "kexec_load": 246, "add_key": 248, "request_key": 249, "keyctl": 250, "unshare": 272,
    "perf_event_open": 298, "fanotify_init": 300, "name_to_handle_at": 303, "open_by_handle_at": 304,
    "clock_adjtime": 305, "setns": 308, "process_vm_readv": 310, "process_vm_writev": 311, "finit_module": 313,
    "kexec_file_load": 320, "bpf": 321, "userfaultfd": 323, "io_uring_setup": 425, "io_uring_enter": 426,
    "io_uring_register": 427, "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431,
    "fsmount": 432, "fspick": 433, "mount_setattr": 442, "quotactl_fd": 443, "memfd_secret": 447,
}
_CLONE, _CLONE3 = 56, 435
_CLONE_NEW_FLAGS = 0x7E020000  # NEWNS | NEWCGROUP | NEWUTS | NEWIPC | NEWUSER | NEWPID | NEWNET

# classic BPF opcodes and seccomp return values
_LD_W_ABS, _JEQ_K, _JGE_K, _JSET_K, _RET_K = 0x20, 0x15, 0x35, 0x45, 0x06
_RET_ALLOW, _RET_KILL_PROCESS, _RET_ERRNO = 0x7FFF0000, 0x80000000, 0x00050000
# offsets in struct seccomp_data: nr, arch, then args[6] (u64 each; the low half of args[0] on little-endian)
_NR, _ARCH, _ARG0_LOW = 0, 4, 16


def _insn(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
    return struct.pack("=HBBI", code, jt, jf, k)


def seccomp_filter() -> bytes | None:
    """The compiled filter, or None where these syscall numbers do not apply."""
    if platform.machine() != "x86_64":
        return None
    denied = sorted(_DENIED.values())
    # layout: [0] ld arch, [1] arch ok?, [2] kill, [3] ld nr, [4] x32?, [5] clone3?, [6] clone?,
    # [7, 7+n) one jeq per denied number, [7+n] allow, [8+n] ld clone flags, [9+n] any CLONE_NEW*?,
    # [10+n] allow, [11+n] EPERM, [12+n] ENOSYS. Jumps go forward only: jt/jf = target - (index + 1).
    n = len(denied)
    clone_flags, eperm, enosys = 8 + n, 11 + n, 12 + n
    prog = [
        _insn(_LD_W_ABS, _ARCH),
        _insn(_JEQ_K, _AUDIT_ARCH_X86_64, jt=1),
        _insn(_RET_K, _RET_KILL_PROCESS),
        _insn(_LD_W_ABS, _NR),
        _insn(_JGE_K, _X32_BIT, jt=eperm - 5),
        _insn(_JEQ_K, _CLONE3, jt=enosys - 6),
        _insn(_JEQ_K, _CLONE, jt=clone_flags - 7),
    ]
    prog += [_insn(_JEQ_K, nr, jt=eperm - (8 + i)) for i, nr in enumerate(denied)]
    prog += [
        _insn(_RET_K, _RET_ALLOW),
        _insn(_LD_W_ABS, _ARG0_LOW),
        _insn(_JSET_K, _CLONE_NEW_FLAGS, jt=eperm - (10 + n)),
        _insn(_RET_K, _RET_ALLOW),
        _insn(_RET_K, _RET_ERRNO | errno.EPERM),
        _insn(_RET_K, _RET_ERRNO | errno.ENOSYS),
    ]
    return b"".join(prog)
