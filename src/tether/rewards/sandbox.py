"""Run a model-written Python program against tests in a sandbox: a separate, locked-down process.

    result = run_program(code, ["assert add(1, 2) == 3"], SandboxLimits(wall_seconds=5))
    result.passed, result.n_passed, result.n_total, result.status      # True, 1, 1, "ok"
    results = run_many([(code_a, tests_a), (code_b, tests_b)], workers=2)   # a small bounded pool

Tests (`record["tests"]`) are a list of snippets (each one test) or one snippet; in one snippet every
top-level `assert` is a test and the other top-level statements are setup run in order, and a snippet without
a top-level assert is one test that passes when it runs to the end (HumanEval's `check(candidate)`).

Layers. Each is attempted on its own; `SandboxResult.layers` names those that took effect in that run.
  parent side, always:
    tmpdir        a fresh working directory for the program, deleted afterwards
    wall-timeout  at the wall-clock limit the process group (and cgroup, and sandbox uid) is SIGKILLed
    pipe-cap      stdout/stderr are read up to `max_output` bytes each; a program writing more is killed
    sweep         after every run: killpg, then every process of the pids cgroup / sandbox uid is killed
  in the child, before the program runs (root-only layers need `kernel_isolation=True`):
    rlimits       RLIMIT_CPU (SIGXCPU, SIGKILL 1 s later), RLIMIT_AS, RLIMIT_FSIZE, RLIMIT_NOFILE, CORE=0
    nproc         RLIMIT_NPROC, where it binds: a non-root uid (the kernel exempts uid 0 from it)
    pids-cgroup   (root) a pids cgroup with pids.max = max_procs; also how stray processes are found
    netns         (root; else an unprivileged user namespace where the kernel allows one) a new network
                  namespace: no interfaces, loopback down, nothing reachable, not even 127.0.0.1
    ro-fs         (root) a new mount namespace: every mount read-only, nosuid, nodev; the working directory
                  a fresh tmpfs of `disk_mb`; /dev a tmpfs with only null, zero, full, random, urandom
    uid           (root) run as a fresh random unprivileged uid, when the interpreter is readable by others
    caps          (root, when the uid cannot change, e.g. Python installed under a private /root) drop every
                  capability from the effective, permitted and bounding sets: uid 0 without privileges
    no-new-privs  prctl(PR_SET_NO_NEW_PRIVS): exec never gains privileges (setuid binaries)
    audit         a sys.addaudithook hook: no new processes, no sockets except AF_UNIX pairs, no name
                  lookups, no ctypes/cffi, no writes outside the working directory, no signals to others
As root this is defence in depth: kernel walls (namespaces, cgroup, uid or no capabilities, rlimits) behind
the audit hook. Two gaps remain. With "caps" instead of "uid" the program is still uid 0, so only the audit
hook stops it signalling other root processes. Without root, only rlimits, the audit hook, the process-group
kill and (with unprivileged user namespaces) netns remain, and the audit hook stops Python-level escapes, not
a program that reaches raw syscalls through some C extension. For hostile code: root, with a world-readable
Python (system or /opt), or a container/VM around it all.

The harness shares its process with the program, so a program written to fool it (patching builtins, walking
frames) could forge a pass; a per-run nonce only stops it from printing a fake report. The sandbox contains
programs; judging adversarial reward hacking is a separate problem.

Run statuses: ok (the tests ran, each passed or failed), timeout (CPU or wall-clock limit), memory
(MemoryError under RLIMIT_AS), crash (the program raised while loading, or the process ended without a
report: exit, fatal signal), killed (an outside SIGKILL, or more output than `max_output`).

This file is also the child's entry point (run via `_BOOT`), so its top-level imports stay small and
stdlib-only; parent-only modules are imported inside the parent functions.
"""

from __future__ import annotations

import ast
import json
import os
import resource
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass

_CHILD_NAME = "__tether_sandbox__"
# `-c` instead of running this file as a script: a script's directory goes first on sys.path (Python 3.10),
# and this directory holds math.py and code.py, which would shadow the standard library for the program.
_BOOT = (
    f"import sys, types; p = sys.argv[1]; name = {_CHILD_NAME!r}; "
    "m = sys.modules[name] = types.ModuleType(name); m.__file__ = p; "
    "exec(compile(open(p).read(), p, 'exec'), m.__dict__)"
)
STATUSES = ("ok", "timeout", "memory", "crash", "killed")


@dataclass(frozen=True)
class SandboxLimits:
    cpu_seconds: float = 5.0  # RLIMIT_CPU: SIGXCPU at this many CPU seconds, SIGKILL one second later
    wall_seconds: float = 10.0  # wall-clock limit for the whole run (startup included)
    memory_mb: int = 1024  # RLIMIT_AS: address space per process
    file_size_mb: int = 16  # RLIMIT_FSIZE: largest file the program may write
    disk_mb: int = 64  # size of the tmpfs working directory (root only; else RLIMIT_FSIZE per file is all)
    max_procs: int = 16  # pids.max of the cgroup / RLIMIT_NPROC (threads count as processes)
    max_output: int = 65536  # bytes read per stream (stdout, stderr); more and the program is killed
    open_files: int = 64  # RLIMIT_NOFILE
    allow_subprocess: bool = False  # let the program start processes (contained only by kernel layers)
    kernel_isolation: bool = True  # as root: namespaces, cgroup, uid/caps (False: audit hook + rlimits only)


@dataclass
class SandboxResult:
    passed: bool  # every test passed and the run ended cleanly
    n_passed: int
    n_total: int
    status: str  # one of STATUSES
    stdout: str = ""
    stderr: str = ""
    error: str = ""  # why the run is not ok, or the exception the program raised while loading
    elapsed: float = 0.0  # wall-clock seconds
    returncode: int | None = None  # of the sandbox process; negative = killed by that signal
    layers: tuple[str, ...] = ()  # isolation layers that took effect
    pid: int = 0  # the sandbox process (also its process group id)
    uid: int | None = None  # the unprivileged uid it ran as, when the uid layer was active
    workdir: str = ""  # its working directory (deleted when the run returns)


# ------------------------------------------------------------------------------------------------------------
# Parent side
# ------------------------------------------------------------------------------------------------------------


def split_tests(tests: str | Sequence[str]) -> list[tuple[str, str]]:
    """Split `record["tests"]` into units `(kind, source)`, kind "setup" or "test", in execution order.

    A list: each string is one test (it may hold several statements). A string: each top-level `assert` is one
    test, every other top-level statement is setup; without a top-level assert the whole string is one test.
    Raises ValueError for tests that do not parse or are empty: bad data must not score as a failing program.
    """
    if isinstance(tests, str):
        try:
            body = ast.parse(tests).body
        except SyntaxError as e:
            raise ValueError(f"tests do not parse: {e}") from e
        if not any(isinstance(s, ast.Assert) for s in body):
            units = [("test", tests)] if body else []
        else:
            units = [("test" if isinstance(s, ast.Assert) else "setup", ast.unparse(s)) for s in body]
    elif isinstance(tests, Sequence) and all(isinstance(t, str) for t in tests):
        units = []
        for i, t in enumerate(tests):
            try:
                ast.parse(t)
            except SyntaxError as e:
                raise ValueError(f"test {i} does not parse: {e}") from e
            units.append(("test", t))
    else:
        raise ValueError(f"tests must be a string or a list of strings, got {type(tests).__name__}")
    if not any(kind == "test" for kind, _ in units):
        raise ValueError("no tests to run")
    return units


def run_program(code: str, tests: str | Sequence[str], limits: SandboxLimits | None = None) -> SandboxResult:
    """Run `code` then its tests in a fresh sandbox process; always returns, never leaves a process behind."""
    import shutil
    import tempfile

    limits = limits or SandboxLimits()
    units = split_tests(tests)
    root = os.geteuid() == 0 and limits.kernel_isolation
    uid = _fresh_uid() if root and _interpreter_world_readable() else None
    base = tempfile.mkdtemp(prefix="tether-sbx-")
    cgroup = _make_cgroup(os.path.basename(base), limits.max_procs) if root else None
    try:
        return _run_in(base, code, units, limits, root, uid, cgroup)
    finally:
        if cgroup:
            _remove_cgroup(cgroup)
        shutil.rmtree(base, onerror=_force_remove)


def _run_in(
    base: str, code: str, units: list, limits: SandboxLimits, root: bool, uid: int | None, cgroup: str | None
) -> SandboxResult:
    """Start the sandbox process on `base`/work, collect its output and report, and kill what is left."""
    import subprocess
    import time

    workdir = os.path.join(base, "work")
    os.mkdir(workdir, 0o700)
    with open(os.path.join(workdir, "solution.py"), "w") as f:
        f.write(code)
    if uid is not None:
        os.chmod(base, 0o711)  # the sandbox uid may pass through to work/, not list or read the config
        for path in (workdir, os.path.join(workdir, "solution.py")):
            os.chown(path, uid, uid)
    nonce = os.urandom(16).hex()
    rfd, wfd = os.pipe()
    try:
        config = {"workdir": workdir, "units": units, "nonce": nonce, "result_fd": wfd, "uid": uid,
                  "cgroup": cgroup, "root": root, "limits": limits.__dict__}
        config_path = os.path.join(base, "config.json")
        with os.fdopen(os.open(config_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
            json.dump(config, f)
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": workdir, "TMPDIR": workdir}
        start = time.monotonic()
        try:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-B", "-c", _BOOT, os.path.abspath(__file__), config_path],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, pass_fds=(wfd,),
                cwd=workdir, env=env, start_new_session=True,
            )
        finally:
            os.close(wfd)
        try:
            streams, over, timed_out = _collect(proc, rfd, start + limits.wall_seconds, limits.max_output)
        finally:
            _kill_everything(proc.pid, cgroup, uid)
            returncode = proc.wait()
            proc.stdout.close()
            proc.stderr.close()
    finally:
        os.close(rfd)
    elapsed = time.monotonic() - start
    result = _interpret(streams, nonce, returncode, over, timed_out, sum(k == "test" for k, _ in units))
    result.elapsed, result.returncode, result.pid, result.workdir = elapsed, returncode, proc.pid, workdir
    result.layers = ("tmpdir", "wall-timeout", "pipe-cap", "sweep", *result.layers)
    result.uid = uid if "uid" in result.layers else None
    return result


def run_many(
    jobs: Sequence[tuple[str, str | Sequence[str]]], limits: SandboxLimits | None = None, workers: int = 2
) -> list[SandboxResult]:
    """Run `(code, tests)` jobs with at most `workers` sandboxes at a time; results in input order."""
    from concurrent.futures import ThreadPoolExecutor

    # Threads only wait on child processes; the sandboxes themselves are what use the CPU.
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(lambda job: run_program(job[0], job[1], limits), jobs))


def _collect(proc, rfd: int, deadline: float, cap: int) -> tuple[dict[str, bytes], bool, bool]:
    """Read stdout, stderr and the report pipe until EOF, exit, the deadline, or a stream passing `cap` bytes.

    Returns (data per stream, over_cap, timed_out). Stops 0.2 s after the sandbox process exits even if some
    descendant still holds a pipe open (it is killed right after).
    """
    import selectors
    import time

    sel = selectors.DefaultSelector()
    for fd, name in ((proc.stdout.fileno(), "stdout"), (proc.stderr.fileno(), "stderr"), (rfd, "report")):
        sel.register(fd, selectors.EVENT_READ, name)
    data = {"stdout": bytearray(), "stderr": bytearray(), "report": bytearray()}
    exited_at = None
    try:
        while sel.get_map():
            now = time.monotonic()
            if now >= deadline:
                return data, False, True
            if exited_at is None and _has_exited(proc.pid):
                exited_at = now
            if exited_at is not None and now - exited_at > 0.2:
                break
            for key, _ in sel.select(min(deadline - now, 0.1)):
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    sel.unregister(key.fd)
                    continue
                data[key.data] += chunk
                if key.data != "report" and len(data[key.data]) > cap:
                    del data[key.data][cap:]
                    return data, True, False
        return data, False, False
    finally:
        sel.close()


def _has_exited(pid: int) -> bool:
    """True once `pid` has exited; it stays unreaped (WNOWAIT), so its pid is not reused while we killpg."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _kill_everything(pid: int, cgroup: str | None, uid: int | None) -> None:
    """SIGKILL the sandbox's process group, every process in its cgroup and every process of its uid."""
    try:
        os.killpg(pid, signal.SIGKILL)  # the leader is not reaped yet, so this group id is still ours
    except (ProcessLookupError, PermissionError):
        pass
    if cgroup:
        _sweep(lambda: _read_pids(os.path.join(cgroup, "cgroup.procs")))
    if uid is not None:
        _sweep(lambda: _pids_of_uid(uid))


def _sweep(list_pids, rounds: int = 200) -> None:
    """Kill what `list_pids()` returns until it returns nothing (a fork bomb may fork between two rounds)."""
    import time

    for _ in range(rounds):
        pids = list_pids()
        if not pids:
            return
        for p in pids:
            try:
                os.kill(p, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.005)


def _read_pids(path: str) -> list[int]:
    try:
        with open(path) as f:
            return [int(line) for line in f if line.strip()]
    except OSError:
        return []


def _pids_of_uid(uid: int) -> list[int]:
    """Live (non-zombie) processes whose real uid is `uid`, from /proc."""
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/status") as f:
                status = f.read()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        zombie = fields.get("State", "").strip().startswith("Z")
        if int(fields.get("Uid", "-1").split()[0]) == uid and not zombie:
            pids.append(int(name))
    return pids


def _fresh_uid() -> int:
    """A random uid in [2^30, 2^31): no file, user or other sandbox owns it, so RLIMIT_NPROC and kill sweeps
    by uid concern this run alone."""
    import secrets

    return (1 << 30) + secrets.randbelow(1 << 30)


def _interpreter_world_readable() -> bool:
    """Can an unprivileged uid run this interpreter? Every directory on sys.path (and its ancestors) must be
    searchable by others; pyenv under a 0700 /root is the common case where it is not."""
    import stat

    for top in {sys.base_prefix, sys.prefix, *(p for p in sys.path if p and os.path.isdir(p))}:
        path = os.path.realpath(top)
        while True:
            try:
                if not os.stat(path).st_mode & stat.S_IXOTH:
                    return False
            except OSError:
                return False
            if path == "/":
                break
            path = os.path.dirname(path)
    return True


def _make_cgroup(name: str, max_procs: int) -> str | None:
    """A new pids cgroup (v1, else v2) below our own with pids.max = max_procs; None if impossible."""
    try:
        with open("/proc/self/cgroup") as f:
            entries = [line.strip().split(":", 2) for line in f if line.strip()]
    except OSError:
        return None
    candidates = [("/sys/fs/cgroup/pids", rel) for _, ctrl, rel in entries if "pids" in ctrl.split(",")]
    candidates += [("/sys/fs/cgroup", rel) for _, ctrl, rel in entries if ctrl == ""]
    for mount, rel in candidates:
        parent = os.path.join(mount, rel.lstrip("/"))
        if mount == "/sys/fs/cgroup" and not _v2_has_pids(parent):
            continue
        path = os.path.join(parent, name)
        try:
            os.mkdir(path)
        except OSError:
            continue
        try:
            with open(os.path.join(path, "pids.max"), "w") as f:
                f.write(str(max_procs))
            return path
        except OSError:
            _remove_cgroup(path)
    return None


def _v2_has_pids(parent: str) -> bool:
    try:
        with open(os.path.join(parent, "cgroup.subtree_control")) as f:
            return "pids" in f.read().split()
    except OSError:
        return False


def _remove_cgroup(path: str) -> None:
    import time

    for _ in range(100):  # rmdir fails with EBUSY until the last (killed) member is gone
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError:
            _sweep(lambda: _read_pids(os.path.join(path, "cgroup.procs")), rounds=1)
            time.sleep(0.01)


def _force_remove(func, path, exc_info) -> None:
    """rmtree error handler: a program may have made its files read-only or its directories unsearchable."""
    try:
        os.chmod(os.path.dirname(path), 0o700)
        os.chmod(path, 0o700)
        func(path)
    except OSError:
        pass


def _interpret(
    streams: dict[str, bytes], nonce: str, returncode: int, over: bool, timed_out: bool, n_total: int
) -> SandboxResult:
    """Turn what came back from the sandbox into a SandboxResult (status rules in the module docstring)."""
    out = bytes(streams["stdout"]).decode("utf-8", "replace")
    err = bytes(streams["stderr"]).decode("utf-8", "replace")
    lines = []
    for line in bytes(streams["report"]).splitlines():
        try:
            msg = json.loads(line)
        except ValueError:
            continue
        if isinstance(msg, dict) and msg.get("nonce") == nonce:
            lines.append(msg)
    layers = next((m["layers"] for m in lines if "layers" in m), ())
    report = next((m for m in lines if "results" in m), None)
    result = SandboxResult(passed=False, n_passed=0, n_total=n_total, status="crash", stdout=out, stderr=err)
    result.layers = tuple(layers)
    if timed_out or returncode == -signal.SIGXCPU:
        result.status, result.error = "timeout", "time limit exceeded"
    elif over:
        result.status, result.error = "killed", "output limit exceeded"
    elif report is None:
        died = f"killed by signal {-returncode}" if returncode < 0 else f"exited with code {returncode}"
        if not lines:  # it died before the program ran: our failure, not the program's
            raise RuntimeError(f"the sandbox did not start ({died}): {err[-2000:]}")
        result.status = "killed" if returncode == -signal.SIGKILL else "crash"
        result.error = f"no report: {died}"
    elif report.get("memory"):
        result.status, result.error = "memory", "memory limit exceeded"
    elif report.get("load_error"):
        result.status, result.error = "crash", report["load_error"]
    else:
        result.status = "ok"
        result.n_passed = sum(bool(x) for x in report.get("results", ()))
        result.passed = n_total > 0 and result.n_passed == n_total
    return result


# ------------------------------------------------------------------------------------------------------------
# Child side: runs in the sandbox process, as root until `_isolate` returns
# ------------------------------------------------------------------------------------------------------------

_CLONE_NEWNS, _CLONE_NEWUSER, _CLONE_NEWNET = 0x00020000, 0x10000000, 0x40000000
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 1, 2, 4, 8
_MS_REMOUNT, _MS_BIND, _MS_REC, _MS_PRIVATE = 32, 4096, 16384, 1 << 18
_PR_CAPBSET_DROP, _PR_SET_NO_NEW_PRIVS = 24, 38
_DEVICES = {"null": 3, "zero": 5, "full": 7, "random": 8, "urandom": 9}  # char devices, major 1


def _child_main(config_path: str) -> None:
    with open(config_path) as f:
        cfg = json.load(f)
    os.unlink(config_path)  # the nonce is not left on disk for the program to read
    limits = cfg["limits"]
    layers = []
    if cfg["cgroup"] and _attempt(_join_cgroup, cfg["cgroup"]):
        layers.append("pids-cgroup")
    layers += _isolate(cfg["workdir"], cfg["uid"], cfg["root"], limits["disk_mb"])
    layers += _set_rlimits(limits, uid_dropped="uid" in layers, root=os.geteuid() == 0)
    os.chdir(cfg["workdir"])
    _install_audit_hook(cfg["workdir"], limits["allow_subprocess"])
    layers.append("audit")
    # Two report lines: the layers now (known even if the program then times out), the results at the end.
    os.write(cfg["result_fd"], json.dumps({"nonce": cfg["nonce"], "layers": layers}).encode() + b"\n")
    report = _run_units(cfg["units"])
    report["nonce"] = cfg["nonce"]
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:  # the program may have replaced or closed them
            pass
    os.write(cfg["result_fd"], json.dumps(report).encode() + b"\n")
    os._exit(0)  # skip the program's atexit handlers and non-daemon threads


def _attempt(step, *args) -> bool:
    """Run one isolation step; a step that fails is not a layer of this run (the others still hold)."""
    try:
        return bool(step(*args))
    except OSError:
        return False


def _join_cgroup(path: str) -> bool:
    with open(os.path.join(path, "cgroup.procs"), "w") as f:
        f.write(str(os.getpid()))
    return True


def _switch_uid(uid: int) -> bool:
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    return True


def _isolate(workdir: str, uid: int | None, root: bool, disk_mb: int) -> list[str]:
    """Namespaces, read-only mounts, then the uid switch or capability drop; returns the layers that held."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
    layers = []
    if root:
        if libc.unshare(_CLONE_NEWNET) == 0:
            layers.append("netns")
        if libc.unshare(_CLONE_NEWNS) == 0 and _attempt(_read_only_mounts, libc, workdir, uid or 0, disk_mb):
            layers.append("ro-fs")
        if uid is not None and _attempt(_switch_uid, uid):
            layers.append("uid")
        elif _attempt(_drop_capabilities, libc):
            layers.append("caps")
    elif os.geteuid() != 0 and libc.unshare(_CLONE_NEWUSER | _CLONE_NEWNET) == 0:
        layers.append("netns")
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0:
        layers.append("no-new-privs")
    del libc
    # Forget ctypes: the program must not find it already imported (the audit hook blocks importing it anew).
    for name in [m for m in sys.modules if m in ("ctypes", "_ctypes") or m.startswith("ctypes.")]:
        del sys.modules[name]
    import gc

    gc.collect()
    return layers


def _read_only_mounts(libc, workdir: str, owner: int, disk_mb: int) -> bool:
    """In a fresh mount namespace: every mount read-only/nosuid/nodev, `workdir` a new tmpfs of `disk_mb` MiB
    (holding a copy of solution.py), and a minimal /dev."""
    import stat

    def mount(src, target, fstype, flags, data=None):
        enc = [None if x is None else os.fsencode(x) for x in (src, target, fstype, data)]
        return libc.mount(enc[0], enc[1], enc[2], flags, enc[3]) == 0

    with open(os.path.join(workdir, "solution.py"), "rb") as f:
        code = f.read()
    options = f"size={disk_mb}m,mode=700,uid={owner},gid={owner}"
    if not mount(None, "/", None, _MS_REC | _MS_PRIVATE):
        return False
    if not mount("tmpfs", workdir, "tmpfs", _MS_NOSUID | _MS_NODEV, options):
        return False
    with open(os.path.join(workdir, "solution.py"), "wb") as f:
        f.write(code)
    os.chown(os.path.join(workdir, "solution.py"), owner, owner)
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4].encode().decode("unicode_escape") for line in f]
    for point in points:
        if point != workdir:
            ok = mount(None, point, None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY | _MS_NOSUID | _MS_NODEV)
            if point == "/" and not ok:
                return False
    if not mount("tmpfs", "/dev", "tmpfs", _MS_NOSUID | _MS_NOEXEC, "mode=755,size=64k"):
        return False
    for name, minor in _DEVICES.items():
        os.mknod(f"/dev/{name}", stat.S_IFCHR | 0o666, os.makedev(1, minor))
        os.chmod(f"/dev/{name}", 0o666)
    for i, name in enumerate(("stdin", "stdout", "stderr")):
        os.symlink(f"/proc/self/fd/{i}", f"/dev/{name}")
    os.symlink("/proc/self/fd", "/dev/fd")
    return mount(None, "/dev", None, _MS_REMOUNT | _MS_RDONLY | _MS_NOSUID | _MS_NOEXEC)


def _drop_capabilities(libc) -> bool:
    """Empty the bounding set, then the effective, permitted and inheritable sets (capset, version 3)."""
    import ctypes

    for cap in range(64):
        if libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            break  # EINVAL past the last capability this kernel knows
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)
    data = (ctypes.c_uint32 * 6)()
    if libc.capset(header, data) != 0:
        return False
    with open("/proc/self/status") as f:
        return any(line.split() == ["CapEff:", "0000000000000000"] for line in f)


def _set_rlimits(limits: dict, uid_dropped: bool, root: bool) -> list[str]:
    """Soft = hard for every limit (the program cannot raise them), except CPU: SIGXCPU, SIGKILL 1 s later."""
    cpu = max(1, -int(-limits["cpu_seconds"] // 1))  # ceil; no `import math`: unreadable after a uid switch
    settings = {
        resource.RLIMIT_CPU: (cpu, cpu + 1),
        resource.RLIMIT_AS: (limits["memory_mb"] << 20,) * 2,
        resource.RLIMIT_FSIZE: (limits["file_size_mb"] << 20,) * 2,
        resource.RLIMIT_NOFILE: (limits["open_files"],) * 2,
        resource.RLIMIT_CORE: (0, 0),
    }
    layers = ["rlimits"]
    if uid_dropped or not root:
        # RLIMIT_NPROC counts every process of the real uid: a fresh uid has none, our own uid has some.
        n = limits["max_procs"] + (0 if uid_dropped else _count_own_processes())
        settings[resource.RLIMIT_NPROC] = (n, n)
        layers.append("nproc")
    for which, value in settings.items():
        resource.setrlimit(which, value)
    return layers


def _count_own_processes() -> int:
    uid = os.getuid()
    n = 0
    for name in os.listdir("/proc"):
        try:
            n += name.isdigit() and os.stat(f"/proc/{name}").st_uid == uid
        except OSError:
            pass
    return n


_PROCESS_EVENTS = {"os.fork", "os.forkpty", "os.system", "os.exec", "os.posix_spawn", "os.spawn",
                   "subprocess.Popen", "pty.spawn"}
_NETWORK_EVENTS = {"socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg", "socket.getaddrinfo",
                   "socket.gethostbyname", "socket.gethostbyaddr", "socket.getnameinfo", "socket.sethostname"}
# event -> positions of the path arguments that get written, created or changed
_WRITE_EVENTS = {
    "os.remove": (0,), "os.rmdir": (0,), "os.mkdir": (0,), "os.rename": (0, 1), "os.link": (1,),
    "os.symlink": (1,), "os.truncate": (0,), "os.chmod": (0,), "os.chown": (0,), "os.utime": (0,),
    "os.chflags": (0,), "os.lchflags": (0,), "os.setxattr": (0,), "os.removexattr": (0,),
    "sqlite3.connect": (0,),
}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_BLOCKED = {"ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata", "gc.get_objects", "gc.get_referrers",
            "gc.get_referents", "resource.setrlimit", "resource.prlimit", "os.kill", "os.killpg",
            "signal.pthread_kill"}


def _install_audit_hook(workdir: str, allow_subprocess: bool) -> None:
    """Install the hook (it can never be removed). Decides from the event name and its arguments only."""
    home = os.path.realpath(workdir)
    me = os.getpid()
    blocked_imports = {"_ctypes", "_cffi_backend"}  # raw C calls would go around every check below
    if not allow_subprocess:
        # subprocess stays importable (asyncio imports it) but its C half cannot start anything.
        import types

        fake = types.ModuleType("_posixsubprocess")
        fake.fork_exec = lambda *args: _deny("fork_exec (starting processes)")
        for name in ("_posixsubprocess", "subprocess"):
            sys.modules.pop(name, None)
        sys.modules["_posixsubprocess"] = fake
        blocked_imports.add("_posixsubprocess")

    def inside(path) -> bool:
        if path is None:
            return True
        try:
            if isinstance(path, int):  # a descriptor: where does it point?
                real = os.readlink(f"/proc/self/fd/{path}")
            else:
                real = os.path.realpath(os.fsdecode(os.fspath(path)))
        except (OSError, TypeError, ValueError):
            return False
        if not real.startswith("/"):
            return True  # pipe:[...], socket:[...], anon_inode:...
        return real == home or real.startswith(home + os.sep) or real == "/dev/null"

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = args
            writes = (mode and any(c in mode for c in "wax+")) or (flags or 0) & _WRITE_FLAGS
            # The event does not carry dir_fd, so a directory opened outside could anchor a relative path
            # there (os.open("x", O_CREAT, dir_fd=...)): no directory outside the working directory opens.
            is_dir = not isinstance(path, int) and os.path.isdir(path)
            if (writes or is_dir) and not inside(path):
                what = "writing" if writes else "opening directory"
                _deny(f"{what} {path!r} (outside the working directory)")
        elif event in _WRITE_EVENTS:
            for i in _WRITE_EVENTS[event]:
                if i < len(args) and not inside(args[i]):
                    _deny(f"{event} on {args[i]!r} (outside the working directory)")
        elif event == "import" and args[0] in blocked_imports:
            _deny(f"importing {args[0]}")
        elif event == "socket.__new__":
            import socket

            if args[1] != socket.AF_UNIX:
                _deny(f"a socket of family {args[1]} (network)")
        elif event in _NETWORK_EVENTS:
            _deny(event)
        elif event in _PROCESS_EVENTS and not allow_subprocess:
            _deny(f"{event} (starting processes)")
        elif event in _BLOCKED:
            if event in ("os.kill", "os.killpg") and args[0] in (me, 0):
                return  # signalling itself (or its own group) is harmless
            _deny(event)

    sys.addaudithook(hook)


def _deny(what: str) -> None:
    raise PermissionError(f"sandbox: {what} is not allowed")


def _run_units(units: list[list[str]]) -> dict:
    """Load solution.py, then run each unit in its namespace; a test passes when it raises nothing."""
    import builtins

    ns = {"__name__": "solution", "__file__": "solution.py", "__builtins__": builtins}
    report = {"results": [], "memory": False, "load_error": ""}
    try:
        with open("solution.py") as f:
            exec(compile(f.read(), "solution.py", "exec"), ns)
    except MemoryError:
        report["memory"] = True
        return report
    except BaseException as e:  # SystemExit and KeyboardInterrupt included: nothing escapes the harness
        report["load_error"] = f"{type(e).__name__}: {e}"
        return report
    broken = False  # a setup statement failed: the tests after it cannot pass
    for i, (kind, source) in enumerate(units):
        ok = False
        if not broken:
            try:
                exec(compile(source, f"<test {i}>", "exec"), ns)
                ok = True
            except MemoryError:
                report["memory"] = True
            except BaseException:
                pass
        if kind == "test":
            report["results"].append(ok)
        elif not ok:
            broken = True
    return report


if __name__ == _CHILD_NAME:
    _child_main(sys.argv[2])
