"""Run a model-written Python program against tests in a sandbox it cannot leave and cannot talk out of its verdict.

    result = run_program(code, ["assert add(1, 2) == 3"], SandboxLimits(wall_seconds=5))
    result.passed, result.n_passed, result.n_total, result.status      # True, 1, 1, "ok"
    results = run_many([(code_a, tests_a), (code_b, tests_b)], workers=2)   # a small bounded pool

Tests (`record["tests"]`) are a list of snippets (each one test) or one snippet; in one snippet every top-level
`assert` is a test and the other top-level statements are setup run in order; a snippet without a top-level
assert is one test that passes when it runs to the end (HumanEval's `check(candidate)`). A list of
{"input": ..., "output": ...} dicts is a stdin/stdout test per item.

Isolation (launch.py has the command line, and what was measured on the development machine):
  kernel     bubblewrap for every run: new user, pid, mount, ipc, uts, net and cgroup namespaces; uid 65534
             inside, and as root a fresh host uid in [2^30, 2^31) (setpriv) with no capabilities; a read-only
             tmpfs root holding only the interpreter, its stdlib and the libraries they link (no shell, no /etc,
             no host /proc, no site-packages, no _ctypes); a tmpfs /work of `disk_mb`; the harness as the pid
             namespace's init and --die-with-parent, so nothing the program starts (setsid or not) outlives the
             run or the trainer; a seccomp filter (seccomp.py) and no further user namespaces.
  caps       as root: a pids and a memory cgroup per run for the whole sandbox (v1 or v2, whichever is writable);
             always: RLIMIT_NPROC inside the user namespace (it binds for the fresh uid; not for a uid mapped to
             root), RLIMIT_CPU, RLIMIT_AS, RLIMIT_FSIZE, RLIMIT_NOFILE, RLIMIT_CORE=0 (hard = soft).
  parent     wall-clock deadline; stdout, stderr and the report stream capped while read (box.py); at the end
             SIGKILL to the namespace's init (a pidfd), the process group and the cgroups, then a wait until the
             pid namespace is gone.
  in-process an audit hook (harness.py), defence in depth only: it sees Python-level events, not system calls,
             and its state is bound into its closure (patching names the program can reach changes nothing).
Without bubblewrap nothing runs (SandboxUnavailable) unless SandboxLimits(allow_weak_isolation=True) or
TETHER_SANDBOX_WEAK=1, which run the harness bare (rlimits, audit hook, cgroups as root) and log a warning each run.

Verdicts (plan.py): expected values never enter the program's sandbox. `assert f(x) == 3`-shaped tests send only
`f(x)` in and get its value back as plain JSON data (exact builtin types; an object with an always-True __eq__
is not data and fails); the parent applies `== 3`. Other tests run in a second, clean sandbox that holds no
program code, with the program's functions as proxies that relay each call and return its result as data.
stdin/stdout tests are compared in the parent. A malformed, oversized or missing report scores 0 and never raises.

Run statuses: ok (the tests ran, each passed or failed), timeout (CPU or wall-clock limit), memory (MemoryError,
or the memory cgroup's OOM killer), crash (the program raised while loading, or ended without its report),
killed (an outside SIGKILL, or more output or report than allowed).
"""

from tether.rewards.sandbox.plan import make_plan, split_tests
from tether.rewards.sandbox.run import (
    STATUSES,
    WEAK_ENV,
    SandboxLimits,
    SandboxResult,
    SandboxUnavailable,
    run_many,
    run_program,
)

__all__ = ["STATUSES", "WEAK_ENV", "SandboxLimits", "SandboxResult", "SandboxUnavailable", "make_plan", "run_many",
           "run_program", "split_tests"]
