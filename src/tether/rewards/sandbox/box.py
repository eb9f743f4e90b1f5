"""One sandbox process seen from the parent: started, read with every stream capped, killed with nothing left.

    box = Box.start(job, settings)          # job: what the harness runs; settings: a BoxSettings
    pump([box], deadline, on_line)          # until it ends, goes over a cap, or the deadline passes
    box.close()                             # SIGKILL whatever is left, wait for the pid namespace to die

Every stream is capped while it is read, so a flood never grows the parent: stdout and stderr at `max_output`
bytes each, a report line at `max_report` bytes and the report lines kept (not relayed) at `max_report` in all.
Past a cap the box is killed and `over` names the stream.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from tether.rewards.sandbox import launch

HARNESS_PATH = Path(__file__).with_name("harness.py")
_GRACE = 0.2  # seconds to keep reading after the process exits (a descendant may still hold a pipe)


@dataclass(frozen=True)
class BoxSettings:
    """How one box runs: the limits it gets and the isolation it starts under."""

    cpu_seconds: int
    memory_bytes: int
    file_size_bytes: int
    disk_mb: int
    open_files: int
    max_procs: int
    max_output: int
    max_report: int
    audit_hook: bool
    allow_subprocess: bool
    weak: bool  # no bubblewrap (the caller opted in)


@dataclass
class Box:
    proc: subprocess.Popen
    settings: BoxSettings
    report_fd: int
    request_fd: int | None
    info_fd: int | None
    cgroups: list
    tmp: str
    layers: list[str]
    uid: int | None
    streams: dict = field(default_factory=lambda: {"stdout": bytearray(), "stderr": bytearray()})
    partial: bytearray = field(default_factory=bytearray)  # the report line being read
    info: bytearray = field(default_factory=bytearray)
    kept: int = 0  # report bytes kept by the caller so far
    outbox: bytearray = field(default_factory=bytearray)  # waiting to be written to the request fd
    over: str = ""  # the stream that went past its cap
    open_streams: set = field(default_factory=set)
    exited_at: float | None = None
    stopped: bool = False  # killed by us (over a cap, or no longer needed)
    pid1: int | None = None  # pidfd of the sandbox's pid-namespace init, once bwrap has said its pid
    oom: bool = False
    returncode: int | None = None

    @classmethod
    def start(cls, job: dict, s: BoxSettings, requests: bool = False) -> Box:
        """Start the harness on `job` (its fds, working directory and limits are filled in here). `requests`:
        a pipe the parent writes calls into (serve and judge modes)."""
        root = os.geteuid() == 0
        switch = root and not s.weak and launch.can_switch_uid(launch.interpreter_view())
        uid = launch.fresh_uid() if switch else None
        # in /tmp, not $TMPDIR: the fresh uid must be able to walk to the mountpoint inside it (a private
        # TMPDIR under /root would hide it)
        tmp = tempfile.mkdtemp(prefix="tether-sbx-", dir="/tmp" if os.path.isdir("/tmp") else None)
        os.chmod(tmp, 0o711)  # the fresh uid may pass through to the mountpoint, not list or read
        # pids: the program's processes and threads (the harness is one of them), plus bubblewrap's monitor
        max_pids = s.max_procs + (0 if s.weak else 1)
        cgroups = launch.make_cgroups(os.path.basename(tmp), max_pids, s.memory_bytes) if root else []
        pipes = {}  # name -> (our end, the child's end)
        child_fds = []
        try:
            for name, wanted in (("report", True), ("request", requests), ("info", not s.weak)):
                if wanted:
                    r, w = os.pipe()
                    pipes[name] = (w, r) if name == "request" else (r, w)
            child_fds = [child for _, child in pipes.values()]
            job = {**job, "report_fd": pipes["report"][1], "request_fd": pipes.get("request", (None, None))[1],
                   "workdir": tmp if s.weak else "/work", "max_line": s.max_report, "max_output": s.max_output,
                   "audit_hook": s.audit_hook, "allow_subprocess": s.allow_subprocess,
                   "limits": _rlimits(s, uid, root)}
            argv, layers, data_fds = _command(job, s, uid, tmp, cgroups, pipes.get("info", (None, None))[1])
            child_fds += data_fds
            env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": job["workdir"], "TMPDIR": job["workdir"]}
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    pass_fds=child_fds, env=env, cwd=tmp, start_new_session=True)
        except BaseException:
            for fd in child_fds + [ours for ours, _ in pipes.values()]:
                _close(fd)
            launch.remove_cgroups(cgroups)
            _remove_tree(tmp)
            raise
        for fd in child_fds:
            _close(fd)
        ours = {name: fds[0] for name, fds in pipes.items()}
        box = cls(proc, s, ours["report"], ours.get("request"), ours.get("info"), cgroups, tmp, layers, uid)
        box.open_streams = {"stdout", "stderr", "report"} | ({"info"} if "info" in ours else set())
        if box.request_fd is not None:
            os.set_blocking(box.request_fd, False)
        return box

    def readers(self) -> dict[int, str]:
        fds = {self.proc.stdout.fileno(): "stdout", self.proc.stderr.fileno(): "stderr",
               self.report_fd: "report", self.info_fd: "info"}
        return {fd: name for fd, name in fds.items() if name in self.open_streams and fd is not None}

    def read(self, name: str, fd: int) -> list[bytes]:
        """Read what is waiting on one stream; complete report lines are returned, the rest is kept (capped)."""
        chunk = os.read(fd, 65536)
        if not chunk:
            self.open_streams.discard(name)
            return []
        if name == "info":
            self._take_info(chunk)
            return []
        if name != "report":
            buf = self.streams[name]
            buf += chunk
            if len(buf) > self.settings.max_output:
                del buf[self.settings.max_output:]
                self.stop(over=name)
            return []
        self.partial += chunk
        *lines, rest = bytes(self.partial).split(b"\n")
        self.partial = bytearray(rest)
        if len(self.partial) > self.settings.max_report or any(len(x) > self.settings.max_report for x in lines):
            self.stop(over="report")
            return []
        return lines

    def keep(self, line: bytes) -> bool:
        """Count a report line the caller keeps against the report cap; False (and the box stopped) past it."""
        self.kept += len(line) + 1
        if self.kept > self.settings.max_report:
            self.stop(over="report")
            return False
        return True

    def send(self, line: bytes) -> None:
        if self.request_fd is not None and not self.stopped:
            self.outbox += line if line.endswith(b"\n") else line + b"\n"

    def flush(self) -> None:
        try:
            n = os.write(self.request_fd, self.outbox)
        except BlockingIOError:
            return
        except OSError:  # the sandbox closed its end: it is gone or not listening
            n = len(self.outbox)
        del self.outbox[:n]

    def _take_info(self, chunk: bytes) -> None:
        """bwrap's --info-fd JSON names the host pid of the namespace's init: hold a pidfd on it at once."""
        self.info += chunk[:4096]
        try:
            pid = json.loads(self.info)["child-pid"]
        except (ValueError, KeyError, TypeError):
            return
        self.open_streams.discard("info")
        try:
            fd = os.pidfd_open(pid)
        except (OSError, AttributeError):
            return
        if _is_namespace_init(pid):
            self.pid1 = fd
        else:
            _close(fd)

    def poll_exit(self) -> None:
        if self.exited_at is None and _has_exited(self.proc.pid):
            self.exited_at = time.monotonic()

    def finished(self) -> bool:
        if self.stopped:
            return True
        if self.exited_at is None:
            return False
        return not (self.open_streams - {"info"}) or time.monotonic() - self.exited_at > _GRACE

    def stop(self, over: str = "") -> None:
        """SIGKILL the box now. The pid namespace's init first: the kernel kills everything in the namespace
        with it, and each bwrap then reaps its child and exits, so nothing is left unreaped. Then the process
        group and the cgroups, for whatever that did not reach (a box still starting, weak mode)."""
        self.over = self.over or over
        self.stopped = True
        if self.pid1 is not None:
            try:
                signal.pidfd_send_signal(self.pid1, signal.SIGKILL)
            except OSError:
                pass
            if _wait_readable(self.pid1, 2.0):
                try:
                    self.proc.wait(1.0)
                except subprocess.TimeoutExpired:
                    pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # not reaped yet (or just now by us), so still our group
        except OSError:
            pass
        for pid in launch.cgroup_pids(self.cgroups):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass

    def close(self) -> None:
        """Wait for a box that ended by itself, kill one that did not; return once all of it is gone."""
        if not (self.exited_at is not None and self.proc.poll() is not None):
            self.stop(over=self.over)
        self.returncode = self.proc.wait()
        if self.pid1 is not None:
            _wait_readable(self.pid1, 5.0)  # init's pidfd turns readable once every process in it is gone
            _close(self.pid1)
        self.oom = launch.hit_memory_limit(self.cgroups)
        launch.remove_cgroups(self.cgroups)
        for fd in (self.report_fd, self.request_fd, self.info_fd):
            if fd is not None:
                _close(fd)
        self.proc.stdout.close()
        self.proc.stderr.close()
        _remove_tree(self.tmp)

    def signal_number(self) -> int | None:
        """The signal that ended the harness: bwrap exits 128 + signal (so does the harness on SIGXCPU), a bare
        process has returncode -signal."""
        rc = self.returncode
        if rc is None:
            return None
        return -rc if rc < 0 else rc - 128 if rc > 128 else None

    def text(self, name: str) -> str:
        return bytes(self.streams[name]).decode("utf-8", "replace")


def pump(boxes: list[Box], deadline: float, on_line, done=None) -> bool:
    """Read every box until each has finished (or `done()` says so); True if the deadline came first.

    `on_line(box, line)` gets each complete report line (bytes) as it arrives.
    """
    sel = selectors.DefaultSelector()
    registered: dict[int, tuple] = {}
    try:
        while not (done() if done else all(b.finished() for b in boxes)):
            now = time.monotonic()
            if now >= deadline:
                return True
            wanted = {}
            for b in boxes:
                if b.stopped:
                    continue
                for fd, name in b.readers().items():
                    wanted[fd] = (b, name, selectors.EVENT_READ)
                if b.outbox and b.request_fd is not None:
                    wanted[b.request_fd] = (b, "request", selectors.EVENT_WRITE)
            for fd in set(registered) - set(wanted):
                sel.unregister(fd)
                del registered[fd]
            for fd, key in wanted.items():
                if fd not in registered:
                    sel.register(fd, key[2], key)
                    registered[fd] = key
            if not registered:
                time.sleep(0.002)  # every stream closed: only waiting for the exit
            for key, _ in sel.select(min(deadline - now, 0.05)) if registered else ():
                b, name, _ = key.data
                if b.stopped:
                    continue
                if name == "request":
                    b.flush()
                    continue
                for line in b.read(name, key.fd):
                    on_line(b, line)
            for b in boxes:
                b.poll_exit()
        return False
    finally:
        sel.close()


def _command(job: dict, s: BoxSettings, uid: int | None, tmp: str, cgroups: list, info_fd: int | None):
    """(argv, layers, descriptors the child also inherits): bubblewrap's command with the harness and job in
    memfds, or in weak mode the bare harness with both written into the working directory `tmp`."""
    view = launch.interpreter_view()
    procs = [os.path.join(cg.path, "cgroup.procs") for cg in cgroups]
    cgroup_layers = [f"{c}-cgroup" for cg in cgroups for c in cg.controllers]
    if s.weak:
        (Path(tmp) / "harness.py").write_text(HARNESS_PATH.read_text())
        (Path(tmp) / "job.json").write_text(json.dumps(job))
        return launch.weak_argv(view, procs, ["job.json"], "harness.py"), ["weak"] + cgroup_layers, []
    seccomp = _seccomp_program()
    fds = launch.Fds(_memfd(HARNESS_PATH.read_bytes()), _memfd(json.dumps(job).encode()), info_fd,
                     _memfd(seccomp) if seccomp else None)
    mountpoint = None
    if uid is not None and view.private_root:  # an empty directory to bind the interpreter's prefix on
        mountpoint = os.path.join(tmp, "python")
        os.mkdir(mountpoint)
    argv = launch.bwrap_argv(view, fds, s.disk_mb, uid, procs, mountpoint, ["/sandbox/job.json"])
    layers = ["namespaces", "ro-view", "die-with-parent"] + ["uid"] * (uid is not None) + ["seccomp"] * bool(seccomp)
    return argv, layers + cgroup_layers, [fd for fd in (fds.harness, fds.job, fds.seccomp) if fd is not None]


def _rlimits(s: BoxSettings, uid: int | None, root: bool) -> dict:
    """The harness's rlimits. RLIMIT_NPROC counts the tasks of the sandbox's user: in bubblewrap's user
    namespace exactly the program's (the harness, pid 1, included); bare, the caller's other processes too; for
    a uid that maps to root it does not bind at all (the kernel exempts root's user), so it is not set."""
    limits = {"cpu": max(1, s.cpu_seconds), "as": s.memory_bytes, "fsize": s.file_size_bytes,
              "nofile": s.open_files, "nproc": 0}
    if not s.weak and (uid is not None or not root):
        limits["nproc"] = s.max_procs
    elif s.weak and not root:
        limits["nproc"] = s.max_procs + _count_own_processes()
    return limits


def _count_own_processes() -> int:
    uid, n = os.getuid(), 0
    for name in os.listdir("/proc"):
        try:
            n += name.isdigit() and os.stat(f"/proc/{name}").st_uid == uid
        except OSError:
            pass
    return n


_SECCOMP: list = []


def _seccomp_program() -> bytes | None:
    if not _SECCOMP:
        from tether.rewards.sandbox.seccomp import seccomp_filter

        _SECCOMP.append(seccomp_filter())
    return _SECCOMP[0]


def _memfd(data: bytes) -> int:
    """An anonymous file holding `data`, positioned at 0 (bwrap reads it from there)."""
    fd = os.memfd_create("tether-sandbox", 0)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _is_namespace_init(pid: int) -> bool:
    """/proc/PID/status says NSpid: <host pid> 1 for the init of a child pid namespace."""
    try:
        with open(f"/proc/{pid}/status") as f:
            nspid = next((line.split()[1:] for line in f if line.startswith("NSpid:")), [])
    except OSError:
        return False
    return len(nspid) >= 2 and nspid[-1] == "1"


def _has_exited(pid: int) -> bool:
    """True once `pid` has exited; it stays unreaped (WNOWAIT), so its group id is not reused while we killpg."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _wait_readable(fd: int, timeout: float) -> bool:
    import select

    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(timeout * 1000))


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def _remove_tree(path: str) -> None:
    import shutil

    def force(func, p, exc_info):  # a program (weak mode) may have made its files read-only
        try:
            os.chmod(os.path.dirname(p), 0o700)
            os.chmod(p, 0o700)
            func(p)
        except OSError:
            pass

    shutil.rmtree(path, onerror=force)

