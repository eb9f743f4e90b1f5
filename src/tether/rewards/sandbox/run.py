"""run_program and run_many: a plan (plan.py), one or two boxes (box.py), and the verdict, made in the parent."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

from tether.rewards.sandbox import harness, launch
from tether.rewards.sandbox.box import Box, BoxSettings, pump
from tether.rewards.sandbox.plan import Plan, judge, make_plan

log = logging.getLogger("tether.rewards.sandbox")
STATUSES = ("ok", "timeout", "memory", "crash", "killed")
WEAK_ENV = "TETHER_SANDBOX_WEAK"


class SandboxUnavailable(RuntimeError):
    """bubblewrap is missing and weak isolation was not asked for: untrusted code is not run."""


@dataclass(frozen=True)
class SandboxLimits:
    cpu_seconds: float = 5.0  # RLIMIT_CPU per process: SIGXCPU at this many CPU seconds, SIGKILL one second later
    wall_seconds: float = 10.0  # wall-clock limit for the whole run (startup and, for judged tests, the judge)
    memory_mb: int = 1024  # the whole sandbox (memory cgroup, as root: processes and /work files); RLIMIT_AS each
    file_size_mb: int = 16  # RLIMIT_FSIZE: the largest file the program may write
    disk_mb: int = 64  # size of the tmpfs /work (the working directory)
    max_procs: int = 16  # processes and threads of the program, itself included (pids cgroup, RLIMIT_NPROC)
    max_output: int = 65536  # bytes read per stream (stdout, stderr); more and the program is killed
    max_report: int = 1 << 20  # report bytes one sandbox may send (so also the largest value a call may return)
    open_files: int = 64  # RLIMIT_NOFILE
    allow_subprocess: bool = False  # the audit hook lets the program start processes (the kernel walls still hold)
    audit_hook: bool = True  # the in-process audit hook, defence in depth; the kernel walls do not depend on it
    allow_weak_isolation: bool = False  # without bubblewrap, run anyway with rlimits + audit hook (warns each run;
    # there the hook is all there is, so it stays on and processes stay refused whatever the two fields above say)


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
    returncode: int | None = None  # of the sandbox's outermost process
    layers: tuple[str, ...] = ()  # isolation layers that took effect
    pid: int = 0  # the sandbox's outermost process (also its process group id)
    uid: int | None = None  # the fresh host uid it ran as, when the uid layer was active
    verdicts: tuple[bool, ...] = ()  # per test, in order
    host_dir: str = ""  # the run's directory on the host (gone when the run returns); it also names its cgroups


def run_program(code: str, tests, limits: SandboxLimits | None = None) -> SandboxResult:
    """Run `code` against `tests` in a fresh sandbox; returns, never leaves a process behind, and raises only for
    bad tests (ValueError), a missing bubblewrap (SandboxUnavailable) or a sandbox that cannot start at all."""
    limits = limits or SandboxLimits()
    plan = make_plan(tests)
    settings = _settings(limits)
    start = time.monotonic()
    deadline = start + limits.wall_seconds
    if plan.mode == "judge":
        result = _run_judged(code, plan, settings, deadline)
    else:
        result = _run_direct(code, plan, settings, deadline)
    result.elapsed = time.monotonic() - start
    return result


def run_many(jobs: Sequence[tuple[str, object]], limits: SandboxLimits | None = None,
             workers: int = 2) -> list[SandboxResult]:
    """Run `(code, tests)` jobs with at most `workers` sandboxes at a time; results in input order."""
    from concurrent.futures import ThreadPoolExecutor

    # Threads only wait on child processes; the sandboxes themselves are what use the CPU.
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(lambda job: run_program(job[0], job[1], limits), jobs))


def _settings(limits: SandboxLimits) -> BoxSettings:
    weak = launch.find_tool("bwrap") is None
    if weak and not (limits.allow_weak_isolation or os.environ.get(WEAK_ENV) == "1"):
        raise SandboxUnavailable(
            "bubblewrap (bwrap) is not installed, so untrusted code is not run: install it (apt-get install "
            f"bubblewrap, or scripts/install_bwrap.sh), or accept weak isolation with {WEAK_ENV}=1 or "
            "SandboxLimits(allow_weak_isolation=True)")
    if weak:
        log.warning("tether sandbox: WEAK ISOLATION, no bubblewrap: the program runs as this user with only "
                    "rlimits and an audit hook, this machine's files, processes and network within its reach")
    return BoxSettings(
        cpu_seconds=max(1, -int(-limits.cpu_seconds // 1)), memory_bytes=limits.memory_mb << 20,
        file_size_bytes=limits.file_size_mb << 20, disk_mb=limits.disk_mb, open_files=limits.open_files,
        max_procs=limits.max_procs, max_output=limits.max_output, max_report=limits.max_report,
        audit_hook=limits.audit_hook or weak, allow_subprocess=limits.allow_subprocess and not weak, weak=weak)


def _run_direct(code: str, plan: Plan, s: BoxSettings, deadline: float) -> SandboxResult:
    """calls / io: one box; the values it sends back are compared here with what the plan kept."""
    job = {"mode": plan.mode, "code": code, "units": [list(u) for u in plan.units] if plan.mode == "calls" else [],
           "inputs": list(plan.units) if plan.mode == "io" else []}
    box = Box.start(job, s)
    messages = _Messages(len(plan.units))
    try:
        timed_out = pump([box], deadline, lambda b, line: messages.take(b, line))
    finally:
        box.close()
    values = messages.values(plan)
    status, error = _status(box, messages, timed_out, ended_early="done" not in messages.flags)
    if status == "ok" and plan.mode == "io" and messages.flags.get("memory"):
        status, error = "memory", "memory limit exceeded"
    return _result(box, messages, plan, status, error, judge(plan, values) if status == "ok" else [])


def _run_judged(code: str, plan: Plan, s: BoxSettings, deadline: float) -> SandboxResult:
    """judge: the program serves calls in one box, the tests run in another; the parent relays data between."""
    program = Box.start({"mode": "serve", "code": code}, s, requests=True)
    try:
        judge_box = Box.start({"mode": "judge", "units": [list(u) for u in plan.units],
                               "proxies": list(plan.proxies), "modules": list(plan.modules)}, s, requests=True)
    except BaseException:
        program.close()
        raise
    relay = _Relay(program, judge_box, len(plan.units))
    try:
        timed_out = pump([program, judge_box], deadline, relay.take, done=relay.done)
        program_ended = program.stopped or program.exited_at is not None
    finally:
        program.close()
        judge_box.close()
    status, error = _status(program, relay.program, timed_out, ended_early=program_ended)
    verdicts = relay.verdicts(plan.n_total)
    if status == "ok" and verdicts is None:
        if not relay.judge.flags.get("started"):
            raise RuntimeError(f"the judge sandbox did not start: {judge_box.text('stderr')[-2000:]}")
        status, error = "crash", "the judge ended without verdicts"
    return _result(program, relay.program, plan, status, error, verdicts or [])


class _Messages:
    """What one box reported, kept within its report cap: flags and the first entry per unit index."""

    def __init__(self, n_units: int):
        self.n_units, self.flags, self.entries = n_units, {}, {}

    def take(self, box: Box, line: bytes) -> None:
        if not box.keep(line):
            return
        try:
            msg = harness.loads(line)
        except (ValueError, RecursionError):
            return  # a malformed line is ignored: what it should have said is then missing, and scores 0
        if type(msg) is not dict:
            return
        i = msg.get("i")
        if type(i) is int and 0 <= i < self.n_units:
            self.entries.setdefault(i, msg)
            if msg.get("memory") is True:
                self.flags["memory"] = True
            return
        for key in ("started", "loaded", "done", "memory"):
            if msg.get(key) is True:
                self.flags.setdefault(key, True)
        if key_value := msg.get("load_error"):
            self.flags.setdefault("load_error", str(key_value)[:500])
        if "layers" in msg and type(msg["layers"]) is list and "layers" not in self.flags:
            self.flags["layers"] = [str(x)[:40] for x in msg["layers"][:16]]
        if "verdicts" in msg:
            self.flags.setdefault("verdicts", msg["verdicts"])

    def values(self, plan: Plan) -> list:
        """Per check: calls -> (decoded value,) or None; io -> stdout str or None. Only well-formed entries."""
        out = []
        if plan.mode == "io":
            for i in range(len(plan.units)):
                e = self.entries.get(i, {})
                ok = type(e.get("stdout")) is str and e.get("exit") == 0 and e.get("over") is False
                out.append(e["stdout"] if ok else None)
            return out
        for i, (kind, _) in enumerate(plan.units):
            if kind == "call":
                out.append(_decoded(self.entries.get(i, {})))
        return out


def _decoded(entry: dict):
    if "v" not in entry:
        return None
    try:
        return (harness.decode(entry["v"]),)
    except (ValueError, TypeError, RecursionError, OverflowError):
        return None


class _Relay:
    """Passes the judge's calls to the program and the program's replies back, one call at a time.

    The program's replies are forwarded as raw bytes, never parsed here (the judge decodes them, as data); the
    lines it sends when no call is waiting are kept against its report cap. The run is done when the judge has
    sent its verdicts and the program has loaded, or when either side has ended.
    """

    def __init__(self, program: Box, judge_box: Box, n_units: int):
        self.program_box, self.judge_box = program, judge_box
        self.program, self.judge = _Messages(0), _Messages(n_units)
        self.waiting = False  # a call has gone to the program and its reply has not come back

    def take(self, box: Box, line: bytes) -> None:
        if box is self.program_box:
            if self.waiting and self.program.flags.get("loaded"):
                self.waiting = False
                if b'"memory":true' in line:  # MemoryError in the call (the harness's own spelling)
                    self.program.flags["memory"] = True
                self.judge_box.send(line)
            else:
                self.program.take(box, line)
            return
        if line.startswith(b'{"call":'):  # the judge's request, passed on as it is
            self.waiting = True
            self.program_box.send(line)
        else:
            self.judge.take(box, line)

    def done(self) -> bool:
        p, j = self.program_box, self.judge_box
        program_ended = p.finished() or "load_error" in self.program.flags
        return program_ended or j.finished() and (self.program.flags.get("loaded") or program_ended)

    def verdicts(self, n_total: int) -> list[bool] | None:
        v = self.judge.flags.get("verdicts")
        if type(v) is list and len(v) == n_total and all(type(x) is bool for x in v):
            return v
        return None


def _status(box: Box, messages: _Messages, timed_out: bool, ended_early: bool) -> tuple[str, str]:
    """The run's status from how the program's box ended (rules in the package docstring)."""
    sig = box.signal_number()
    if timed_out or sig == 24:  # SIGXCPU: RLIMIT_CPU
        return "timeout", "time limit exceeded"
    if box.over:
        return "killed", f"{box.over} limit exceeded"
    if box.oom or messages.flags.get("memory"):
        return "memory", "memory limit exceeded"
    if not messages.flags.get("started"):
        raise RuntimeError(f"the sandbox did not start (returncode {box.returncode}): {box.text('stderr')[-2000:]}")
    if "load_error" in messages.flags:
        return "crash", messages.flags["load_error"]
    if ended_early:
        died = f"killed by signal {sig}" if sig else f"exited with code {box.returncode}"
        return ("killed" if sig == 9 else "crash"), f"no report: {died}"
    return "ok", ""


def _result(box: Box, messages: _Messages, plan: Plan, status: str, error: str, verdicts: list[bool]) -> SandboxResult:
    ok = status == "ok"
    layers = box.layers + messages.flags.get("layers", []) + ["wall-timeout", "stream-caps"]
    return SandboxResult(
        passed=ok and bool(verdicts) and all(verdicts), n_passed=sum(verdicts) if ok else 0, n_total=plan.n_total,
        status=status, stdout=box.text("stdout"), stderr=box.text("stderr"), error=error,
        returncode=box.returncode, layers=tuple(layers), pid=box.proc.pid, uid=box.uid, verdicts=tuple(verdicts),
        host_dir=box.tmp)
