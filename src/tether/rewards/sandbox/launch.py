"""How a sandbox process is started: bubblewrap's command line, the interpreter's read-only view, cgroups, the uid.

    view = interpreter_view()                       # what the interpreter needs, found once per process
    argv = bwrap_argv(view, fds, disk_mb, uid, procs, mountpoint, harness_args)

The command, outermost first. Each step exec()s the next, so until bubblewrap forks it is one process, the
trainer's child, and bubblewrap's parent-death signal ties the sandbox to the trainer's thread:
  sh        (root, with cgroups) writes its own pid into each cgroup's cgroup.procs: everything after is inside
  unshare   (root, only when the interpreter sits under a directory others cannot enter, e.g. pyenv in /root)
  + mount   a private mount namespace where that directory is bind-mounted on an empty host directory that the
            unprivileged uid can reach; nothing changes on the host. (An outer bwrap did this first; its monitor
            process broke the parent-death chain: killing the trainer left the sandbox running.)
  setpriv   (root) switch to a fresh uid/gid in [2^30, 2^31) with no groups, no capabilities, no_new_privs and a
            parent-death SIGKILL: files, processes and RLIMIT_NPROC counts on the host belong to this run alone
  bwrap     new user, pid, mount, ipc, uts, net and cgroup namespaces; uid/gid 65534 inside; a tmpfs root made
            read-only, holding only read-only binds of the interpreter, its stdlib and the directories of the
            shared libraries they link (ldd; /usr/bin, /etc, /home and the rest are absent), a fresh /proc
            of the new pid namespace, a minimal /dev, a size-capped tmpfs /work (the
            working directory; /tmp links to it); no further user namespaces, a seccomp filter, a new session,
            --die-with-parent, and the harness as pid 1 (--as-pid-1): the namespace, setsid daemons included,
            dies with it, and no bwrap init is left a zombie (bwrap's monitor exits before reaping its own init,
            leaving it to the machine's init, which in a container may be the trainer itself)
  python    -I -S -B /sandbox/harness.py: the harness (read-only) and the job (program, calls; never expected
            values) are copied in by bwrap from memfds; nothing of the host's filesystem is writable
Measured on the development machine (Debian 12, kernel 6.x, root, cgroup v1): RLIMIT_NPROC set inside the user
namespace does not bind when the namespace's uid maps to host root (20 of 20 forks succeeded at a limit of 5:
the kernel exempts root's user), and binds under the fresh uid (3 more processes, then EAGAIN); pids and memory
cgroups (v1) are writable by root there and bound the whole sandbox.
"""

from __future__ import annotations

import functools
import os
import shutil
import stat
import subprocess
import sys
import sysconfig
from dataclasses import dataclass

SANDBOX_UID = 65534  # the uid/gid inside the user namespace ("nobody")
_JOIN_CGROUPS = 'for p; do [ "$p" = -- ] && break; echo $$ > "$p" || exit 125; shift; done; shift; exec "$@"'
_BIND = 'mount --bind "$1" "$2" || exit 125; shift 2; exec "$@"'


@dataclass(frozen=True)
class View:
    """The interpreter and what it needs, as read-only binds `(host path, sandbox path)`."""

    executable: str
    binds: tuple[tuple[str, str], ...]
    masked_dirs: tuple[str, ...]  # inside a bound tree, but not the stdlib: site-packages (an empty tmpfs)
    masked_files: tuple[str, ...]  # the _ctypes extension (/dev/null on top): no foreign calls from Python
    private_root: str | None  # the prefix others cannot enter, bound on a reachable mountpoint; None if none


@functools.lru_cache(maxsize=1)
def interpreter_view() -> View:
    """The base interpreter behind sys.executable (a venv's python is a symlink to it), its stdlib, extension
    modules and shared libraries. Never the venv's site-packages: the harness is stdlib-only."""
    exe = os.path.realpath(sys.executable)
    stdlib = os.path.realpath(sysconfig.get_path("stdlib"))
    dynload = os.path.realpath(sysconfig.get_config_var("DESTSHARED") or os.path.join(stdlib, "lib-dynload"))
    extensions = sorted(os.path.join(dynload, f) for f in os.listdir(dynload) if f.endswith(".so"))
    ctypes_ext = tuple(f for f in extensions if os.path.basename(f).startswith("_ctypes."))
    libraries = _linked_libraries([exe] + [f for f in extensions if f not in ctypes_ext])
    # Directories, not files: a bind per library (~45 here) made each run ~40 ms slower to set up and tear down.
    paths = [exe, stdlib, dynload] + sorted({os.path.dirname(p) for p in libraries})
    prefix = os.path.realpath(sys.base_prefix)
    private = prefix if not _reachable_by_others(prefix) else None
    binds = tuple((p, p) for p in _outermost(paths))
    site = [os.path.join(stdlib, d) for d in ("site-packages", "dist-packages")]
    return View(exe, binds, tuple(d for d in site if os.path.isdir(d)), ctypes_ext, private)


def _linked_libraries(files: list[str]) -> list[str]:
    """Shared libraries `ldd` reports for `files` (the dynamic loader included), plus libgcc_s, which glibc
    loads at run time for thread cancellation."""
    try:
        out = subprocess.run(["ldd", *files], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        out = ""
    libs = {w for line in out.splitlines() for w in line.split() if w.startswith("/") and not w.endswith(":")}
    libs -= set(files)
    for base in {os.path.dirname(p) for p in libs}:
        extra = os.path.join(base, "libgcc_s.so.1")
        if os.path.exists(extra):
            libs.add(extra)
    if not libs:  # no ldd: every library directory there is, read-only
        libs = {d for d in ("/lib", "/lib64", "/usr/lib", "/usr/lib64") if os.path.isdir(d)}
    return sorted(os.path.abspath(p) for p in libs if os.path.exists(p))


def _outermost(paths: list[str]) -> list[str]:
    """Drop every path that lies inside another one of `paths` (binding the outer one covers it)."""
    kept = []
    for p in sorted(set(paths)):
        if not any(p.startswith(k + os.sep) for k in kept):
            kept.append(p)
    return kept


def _reachable_by_others(path: str) -> bool:
    """Can an unprivileged uid walk down to `path`? Every directory from / to it must be searchable by others."""
    path = os.path.realpath(path)
    while True:
        try:
            if not os.stat(path).st_mode & stat.S_IXOTH:
                return False
        except OSError:
            return False
        if path == "/":
            return True
        path = os.path.dirname(path)


def find_tool(name: str) -> str | None:
    """`name` on PATH or in the usual system directories (a trainer's PATH may be a venv's alone)."""
    return shutil.which(name) or next(
        (p for d in ("/usr/bin", "/bin", "/usr/sbin", "/sbin") if os.access(p := os.path.join(d, name), os.X_OK)),
        None,
    )


def can_switch_uid(view: View) -> bool:
    """As root: are the tools for the fresh uid there (setpriv; unshare and mount for a private prefix)?"""
    tools = ["setpriv"] + (["unshare", "mount"] if view.private_root else [])
    return all(find_tool(t) for t in tools)


@dataclass(frozen=True)
class Fds:
    """Descriptors the command inherits (same numbers inside); None where not used."""

    harness: int
    job: int
    info: int
    seccomp: int | None


def bwrap_argv(view: View, fds: Fds, disk_mb: int, uid: int | None, procs: list[str], mountpoint: str | None,
               harness_args: list[str]) -> list[str]:
    """The full command (see the module docstring); `uid` None: stay the caller's uid (not root, or no setpriv);
    `procs`: cgroup.procs files to join first; `mountpoint`: the empty host directory for view.private_root."""
    inner = [find_tool("bwrap") or "bwrap", "--unshare-all", "--unshare-user", "--disable-userns",
             "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID), "--hostname", "sandbox", "--die-with-parent",
             "--new-session", "--as-pid-1", "--info-fd", str(fds.info)]
    if fds.seccomp is not None:
        inner += ["--seccomp", str(fds.seccomp)]
    for src, dest in view.binds:
        if view.private_root and mountpoint and (src + os.sep).startswith(view.private_root + os.sep):
            src = mountpoint + src[len(view.private_root):]
        inner += ["--ro-bind", src, dest]
    for path in view.masked_dirs:
        inner += ["--tmpfs", path, "--remount-ro", path]
    for path in view.masked_files:
        inner += ["--ro-bind", "/dev/null", path]
    inner += ["--proc", "/proc", "--dev", "/dev", "--size", str(disk_mb << 20), "--tmpfs", "/work",
              "--symlink", "/work", "/tmp", "--ro-bind-data", str(fds.harness), "/sandbox/harness.py",
              "--ro-bind-data", str(fds.job), "/sandbox/job.json", "--remount-ro", "/dev", "--remount-ro", "/",
              "--chdir", "/work", "--", view.executable, "-I", "-S", "-B", "/sandbox/harness.py", *harness_args]
    argv = inner
    if uid is not None:
        argv = [find_tool("setpriv") or "setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
                "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs", "--pdeathsig", "SIGKILL", "--", *argv]
        if view.private_root and mountpoint:
            argv = [find_tool("unshare") or "unshare", "--mount", "--propagation", "private", "--", "/bin/sh",
                    "-c", _BIND, "sh", view.private_root, mountpoint, *argv]
    return _join(procs, argv)


def weak_argv(view: View, procs: list[str], harness_args: list[str], harness_path: str) -> list[str]:
    """Without bubblewrap: the harness alone (rlimits and the audit hook), in the caller's namespaces."""
    return _join(procs, [view.executable, "-I", "-S", "-B", harness_path, *harness_args])


def _join(procs: list[str], argv: list[str]) -> list[str]:
    return ["/bin/sh", "-c", _JOIN_CGROUPS, "sh", *procs, "--", *argv] if procs else argv


def fresh_uid() -> int:
    """A random uid in [2^30, 2^31): no file, user or other sandbox owns it."""
    import secrets

    return (1 << 30) + secrets.randbelow(1 << 30)


# ------------------------------------------------------------------------------------------------------------
# cgroups: a pids and a memory cgroup per run, below our own (v1: one per controller; v2: one for both)
# ------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cgroup:
    path: str
    version: int  # 1 or 2
    controllers: tuple[str, ...]  # of "pids", "memory"


def make_cgroups(name: str, max_pids: int, memory_bytes: int) -> list[Cgroup]:
    """Cgroups capping the run's pids and memory (tmpfs files included), [] where none can be made (not root,
    no writable hierarchy). v2 needs both controllers in our cgroup's subtree_control."""
    try:
        with open("/proc/self/cgroup") as f:
            entries = [line.strip().split(":", 2) for line in f if line.strip()]
    except OSError:
        return []
    made = []
    for ctrl in ("pids", "memory"):
        rel = next((r for _, c, r in entries if ctrl in c.split(",")), None)
        if rel is not None and (cg := _make(f"/sys/fs/cgroup/{ctrl}{rel}", name, 1, (ctrl,))):
            made.append(cg)
    rel = next((r for _, c, r in entries if c == ""), None)
    if not made and rel is not None:
        parent = os.path.join("/sys/fs/cgroup", rel.lstrip("/"))
        try:
            with open(os.path.join(parent, "cgroup.subtree_control")) as f:
                enabled = f.read().split()
        except OSError:
            enabled = []
        if {"pids", "memory"} <= set(enabled) and (cg := _make(parent, name, 2, ("pids", "memory"))):
            made.append(cg)
    for cg in made:
        try:
            _set_limits(cg, max_pids, memory_bytes)
        except OSError:
            remove_cgroups(made)
            return []
    return made


def _make(parent: str, name: str, version: int, controllers: tuple[str, ...]) -> Cgroup | None:
    path = os.path.join(parent, name)
    try:
        os.mkdir(path)
    except OSError:
        return None
    return Cgroup(path, version, controllers)


def _set_limits(cg: Cgroup, max_pids: int, memory_bytes: int) -> None:
    files = {"pids": {"pids.max": max_pids}}
    files["memory"] = ({"memory.limit_in_bytes": memory_bytes, "memory.memsw.limit_in_bytes": memory_bytes}
                       if cg.version == 1 else {"memory.max": memory_bytes, "memory.swap.max": 0})
    for ctrl in cg.controllers:
        for name, value in files[ctrl].items():
            path = os.path.join(cg.path, name)
            if name.startswith("memory.memsw") or name == "memory.swap.max":
                if not os.path.exists(path):  # no swap accounting: nothing to cap
                    continue
            with open(path, "w") as f:
                f.write(str(value))


def cgroup_pids(cgroups: list[Cgroup]) -> list[int]:
    pids = set()
    for cg in cgroups:
        try:
            with open(os.path.join(cg.path, "cgroup.procs")) as f:
                pids.update(int(line) for line in f if line.strip())
        except OSError:
            pass
    return sorted(pids)


def hit_memory_limit(cgroups: list[Cgroup]) -> bool:
    """Did the kernel OOM-kill inside the memory cgroup (v1 memory.oom_control, v2 memory.events)?"""
    for cg in cgroups:
        if "memory" not in cg.controllers:
            continue
        name = "memory.oom_control" if cg.version == 1 else "memory.events"
        try:
            with open(os.path.join(cg.path, name)) as f:
                fields = dict(line.split() for line in f if len(line.split()) == 2)
        except OSError:
            continue
        if int(fields.get("oom_kill", 0)) > 0:
            return True
        if cg.version == 1 and "oom_kill" not in fields:  # kernels before 4.13: did it hit the limit at all?
            try:
                with open(os.path.join(cg.path, "memory.failcnt")) as f:
                    return int(f.read()) > 0
            except OSError:
                pass
    return False


def remove_cgroups(cgroups: list[Cgroup]) -> None:
    """Kill what is left in them, then rmdir (EBUSY until the last killed member is gone)."""
    import signal
    import time

    for cg in cgroups:
        for _ in range(200):
            try:
                os.rmdir(cg.path)
                break
            except FileNotFoundError:
                break
            except OSError:
                for pid in cgroup_pids([cg]):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except OSError:
                        pass
                time.sleep(0.005)
