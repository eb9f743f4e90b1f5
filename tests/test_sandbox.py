"""Sandbox and code reward: plans and verdicts by hand, correct programs score 1, contained programs score 0 and
leave nothing running; the layers a run claims are in effect; without bubblewrap nothing runs unless asked.
The attacks themselves (every one scored 0 with the host untouched) are in test_sandbox_hostile.py."""

import dataclasses
import logging
import os
import struct
import time

import pytest

from tether.rewards.code import code_tests_reward, extract_code, run_completions, score
from tether.rewards.sandbox import (
    SandboxLimits,
    SandboxResult,
    SandboxUnavailable,
    harness,
    launch,
    make_plan,
    run_many,
    run_program,
    split_tests,
)
from tether.rewards.sandbox.plan import judge
from tether.rewards.sandbox.run import _Messages
from tether.rewards.sandbox.seccomp import seccomp_filter

ROOT = os.geteuid() == 0
FAST = SandboxLimits(cpu_seconds=1, wall_seconds=4, memory_mb=256, max_procs=8)
ADD = "def add(a, b):\n    return a + b\n"


def live_processes_of(uid: int | None) -> list[int]:
    """Live (non-zombie) processes whose real uid is `uid`, from /proc."""
    found = []
    for name in os.listdir("/proc"):
        try:
            with open(f"/proc/{name}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
        except (OSError, ValueError):
            continue
        if int(fields["Uid"].split()[0]) == uid and not fields["State"].strip().startswith("Z"):
            found.append(int(name))
    return found


def assert_contained(result, wall_limit: float) -> None:
    assert not result.passed and result.n_passed == 0
    assert result.elapsed < wall_limit + 2.0, result.elapsed
    if result.uid is not None:
        assert live_processes_of(result.uid) == []
    assert result.host_dir and not os.path.exists(result.host_dir)
    name = os.path.basename(result.host_dir)
    assert not [root for root, dirs, _ in os.walk("/sys/fs/cgroup") if name in dirs]


# --- plans: what goes into the sandbox and what the parent keeps ---------------------------------------------


def test_split_tests_string_asserts_and_setup():
    units = split_tests("import math\nx = 2\nassert f(x) == 4\nassert f(0) == 0\n")
    assert units == [("setup", "import math"), ("setup", "x = 2"), ("test", "assert f(x) == 4"),
                     ("test", "assert f(0) == 0")]


def test_split_tests_snippet_without_assert_is_one_test():
    snippet = "def check(candidate):\n    assert candidate(1) == 2\n\ncheck(inc)\n"
    assert split_tests(snippet) == [("test", snippet)]


def test_split_tests_list_and_bad_input():
    assert split_tests(["assert a() == 1", "x = a()\nassert x"]) == [("test", "assert a() == 1"),
                                                                       ("test", "x = a()\nassert x")]
    with pytest.raises(ValueError, match="does not parse"):
        split_tests(["assert (("])
    with pytest.raises(ValueError, match="no tests"):
        split_tests([])
    with pytest.raises(ValueError, match="no tests"):
        split_tests("")
    with pytest.raises(ValueError, match="string or a list"):
        split_tests(42)


def test_plan_keeps_expected_values_in_the_parent():
    plan = make_plan("x = [3, 1]\nassert f(x) == (1, 3)\nassert 2 < g(x)\nassert not h(0)\nassert s.m(1)[0] in {1, 2}")
    assert plan.mode == "calls"
    # only the program's expressions go in; (1, 3), 2 and {1, 2} stay here; `2 < g(x)` is read as `g(x) > 2`
    assert plan.units == (("setup", "x = [3, 1]"), ("call", "f(x)"), ("call", "g(x)"), ("call", "h(0)"),
                          ("call", "s.m(1)[0]"))
    assert plan.checks == (("==", (1, 3)), (">", 2), ("falsy", None), ("in", {1, 2}))
    assert "(1, 3)" not in repr(plan.units) and "{1, 2}" not in repr(plan.units)


@pytest.mark.parametrize("tests", [
    "assert len(f(x)) == 3",  # a builtin around the program's value: the program could replace len
    "assert abs(f(1) - 1.5) < 1e-6",  # ...or abs (`abs = lambda v: 0` would pass)
    "assert isinstance(f(1), int)",  # `assert <builtin call>` is true whenever the program wants it to be
    "assert f(1) == 0.1 + 0.2",  # the expected side is not a literal
    "def helper(v):\n    return v\nassert helper(f(1)) == 1",  # a name the tests define
    "assert f(1) == 2 == f(2)",  # chained
    "assert f(1) is 5",  # identity of an int is the interpreter's
    "def check(candidate):\n    assert candidate(1) == 2\n\ncheck(f)\n",  # HumanEval
])
def test_plan_sends_anything_else_to_the_judge(tests):
    plan = make_plan(tests)
    assert plan.mode == "judge" and "f" in plan.proxies
    assert plan.n_total == 1


def test_plan_judge_proxies_and_modules():
    plan = make_plan("def check(candidate):\n    assert math.isclose(candidate(2), 4.0)\n\nM = 1\ncheck(square)\n")
    # `square` is the program's; `math` is used but not imported, so the judge imports it; check, M are bound
    assert plan.proxies == ("square",) and plan.modules == ("math",)


def test_plan_refuses_tests_nested_too_deeply():
    with pytest.raises(ValueError, match="nested too deeply"):
        make_plan("assert f(1" + "+1" * 100_000 + ") == 1")  # parses; unparsing it overflows the stack


def test_plan_io_tests():
    plan = make_plan([{"input": "1 2\n", "output": "3\n"}, {"input": "", "output": "0"}])
    assert (plan.mode, plan.units, plan.checks, plan.n_total) == ("io", ("1 2\n", ""), ("3\n", "0"), 2)
    with pytest.raises(ValueError, match="string 'input' and 'output'"):
        make_plan([{"input": 1, "output": "2"}])


def test_judge_compares_decoded_values_with_builtin_semantics():
    plan = make_plan(["assert f() == (1, 2)", "assert f() == [1, 2]", "assert f() != 3", "assert f() >= 2.5",
                      "assert f() in [1, 2]", "assert 2 in f()", "assert f() is None", "assert f()",
                      "assert not f()", "assert f() < 1"])
    # values as the sandbox would send them back, one per test; None = nothing usable came back
    values = [((1, 2),), ((1, 2),), (3,), (2.5,), (2,), ([1, 2],), (None,), ([0],), ("",), ("a",)]
    # (1,2)==(1,2) yes; a tuple is not a list; 3 != 3 no; 2.5 >= 2.5 yes; 2 in [1,2] yes; 2 in [1,2] yes;
    # None is None yes; [0] is truthy; "" is falsy; "a" < 1 raises TypeError: a failure, not an error
    assert judge(plan, values) == [True, False, False, True, True, True, True, True, True, False]
    assert judge(plan, [None] * 10) == [False] * 10
    assert judge(plan, values[:3]) == [True, False, False] + [False] * 7  # missing values fail


def test_judge_io_ignores_trailing_whitespace_only():
    plan = make_plan([{"input": "", "output": "1 2\n3\n"}] * 4)
    assert judge(plan, ["1 2  \n3", "1 2\n3\n\n\n", "1  2\n3\n", None]) == [True, True, False, False]


# --- the codec: only plain data crosses ------------------------------------------------------------------------


def test_codec_round_trips_plain_data():
    value = [1, 2.5, -0.0, "é", None, True, (1, (2,)), {3, 4}, frozenset({5}), {"a": 1, (1, 2): [3]}, b"\x00\xff",
             complex(1, -2), float("inf"), float("-inf")]
    back = harness.decode(harness.loads(harness.dumps(harness.encode(value))))
    assert back == value and type(back[6]) is tuple and type(back[7]) is set
    nan = harness.decode(harness.loads(harness.dumps(harness.encode(float("nan")))))
    assert nan != nan


def test_codec_refuses_anything_that_is_not_plain_data():
    class AlwaysEqual:
        def __eq__(self, other):
            return True

    class Int(int):
        def __eq__(self, other):
            return True

    deep = []
    for _ in range(100):
        deep = [deep]
    for value in (AlwaysEqual(), Int(3), [Int(3)], {"k": AlwaysEqual()}, deep, range(3), bytearray(b"x")):
        with pytest.raises(harness.Unencodable):
            harness.encode(value)
    for obj in ({"tuple": 1}, {"a": 1, "b": 2}, {"set": [[1]]}, {"complex": ["a", 1]}, {"dict": [[1]]},
                {"float": "1e9"}, {"bytes": "zz"}):
        with pytest.raises((ValueError, TypeError)):
            harness.decode(obj)
    for line in (b"NaN", b"[1] 2", b"", b"\xff", b"1" * 5000, b"[" * 100_000):
        with pytest.raises((ValueError, RecursionError)):
            harness.loads(line)


def test_malformed_report_lines_are_ignored_never_raised():
    class FakeBox:
        def keep(self, line):
            return True

    m = _Messages(2)
    for line in [b"{", b"\xff\xfe", b"[1, 2]", b'{"results": 123}', b'{"i": "0", "v": 1}', b'{"i": 7, "v": 1}',
                 b'{"i": 0, "v": {"weird": 1}}', b'{"i": 0, "v": 2}', b'{"load_error": ""}', b"[" * 50_000,
                 b'{"started": "yes"}', b'{"layers": 5}']:
        m.take(FakeBox(), line)
    assert m.flags == {}  # "started" must be exactly true; an empty load_error is no error
    plan = make_plan(["assert f() == 1", "assert f() == 2"])
    assert m.values(plan) == [None, None]  # index 0's first entry {"weird": 1} does not decode; 1 never came


# --- seccomp: the filter, run through a small BPF interpreter ----------------------------------------------------


def run_bpf(prog: bytes, nr: int, arch: int = 0xC000003E, arg0: int = 0) -> int:
    """A reference interpreter for the few classic BPF instructions seccomp.py emits."""
    data = struct.pack("=iIQ6Q", nr, arch, 0, arg0, 0, 0, 0, 0, 0)
    insns = [struct.unpack("=HBBI", prog[i:i + 8]) for i in range(0, len(prog), 8)]
    pc, acc = 0, 0
    while True:
        code, jt, jf, k = insns[pc]
        if code == 0x20:
            acc = struct.unpack_from("=I", data, k)[0]
            pc += 1
        elif code in (0x15, 0x35, 0x45):
            taken = acc == k if code == 0x15 else acc >= k if code == 0x35 else bool(acc & k)
            pc += 1 + (jt if taken else jf)
        else:
            assert code == 0x06
            return k


@pytest.mark.skipif(seccomp_filter() is None, reason="the filter is for x86_64 only")
def test_seccomp_filter_decisions():
    prog = seccomp_filter()
    allow, eperm, enosys, kill = 0x7FFF0000, 0x50001, 0x50026, 0x80000000
    assert run_bpf(prog, 0) == allow  # read
    assert run_bpf(prog, 59) == allow  # execve
    assert run_bpf(prog, 101) == eperm  # ptrace
    assert run_bpf(prog, 272) == eperm  # unshare
    assert run_bpf(prog, 447) == eperm  # memfd_secret, the last denied number
    assert run_bpf(prog, 435) == enosys  # clone3: glibc falls back to clone
    assert run_bpf(prog, 56, arg0=0x01200011) == allow  # clone as fork() makes it (SIGCHLD | CHILD_*TID)
    assert run_bpf(prog, 56, arg0=0x10000000) == eperm  # clone(CLONE_NEWUSER)
    assert run_bpf(prog, 0x40000000 + 0) == eperm  # an x32 call
    assert run_bpf(prog, 0, arch=0x40000003) == kill  # i386


# --- correct and incorrect programs ------------------------------------------------------------------------------


def test_correct_program_passes_all_tests():
    r = run_program(ADD, ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"], FAST)
    assert (r.status, r.passed, r.n_passed, r.n_total, r.verdicts) == ("ok", True, 2, 2, (True, True))
    assert {"namespaces", "ro-view", "rlimits", "audit"} <= set(r.layers)


def test_partial_pass_counts_each_assert():
    r = run_program(ADD, "assert add(1, 2) == 3\nassert add(2, 2) == 5\nassert add(0, 0) == 0", FAST)
    assert (r.status, r.passed, r.n_passed, r.n_total, r.verdicts) == ("ok", False, 2, 3, (True, False, True))


def test_failing_setup_fails_the_tests_after_it():
    r = run_program(ADD, "assert add(1, 1) == 2\nfrom missing_module import x\nassert add(2, 2) == 4", FAST)
    assert (r.status, r.n_passed, r.n_total) == ("ok", 1, 2)


def test_humaneval_style_check_function_runs_in_the_judge():
    tests = "def check(f):\n    assert f(1, 2) == 3\n    assert f(5, 5) == 10\n\ncheck(add)\n"
    assert run_program(ADD, tests, FAST).passed
    assert not run_program("def add(a, b):\n    return a - b\n", tests, FAST).passed
    # a builtin around the program's value is applied in the judge, on the data that came back
    r = run_program("def f():\n    return [3, 1, 2]\n", ["assert sorted(f()) == [1, 2, 3]", "assert len(f()) == 4"],
                    FAST)
    assert (r.status, r.verdicts) == ("ok", (True, False))


def test_stdin_stdout_tests():
    code = "import sys\na, b = map(int, sys.stdin.read().split())\nprint(a + b)\n"
    tests = [{"input": "1 2\n", "output": "3\n"}, {"input": "5 5", "output": "10"}, {"input": "2 2", "output": "5"}]
    r = run_program(code, tests, FAST)
    assert (r.status, r.verdicts, r.n_passed, r.n_total) == ("ok", (True, True, False), 2, 3)
    r = run_program("raise ValueError('no')", tests[:1], FAST)  # a crash is a failed case, not a crashed run
    assert (r.status, r.verdicts) == ("ok", (False,)) and "ValueError" in r.stderr


def test_program_that_raises_while_loading_is_a_crash():
    r = run_program("def add(a, b) return a", ["assert add(1, 2) == 3"], FAST)
    assert r.status == "crash" and "SyntaxError" in r.error and r.n_passed == 0
    r = run_program("raise SystemExit(0)", ["assert True"], FAST)
    assert r.status == "crash" and "SystemExit" in r.error


def test_stdout_and_stderr_come_back():
    code = "import sys\nprint('hello')\nprint('oops', file=sys.stderr)\ndef f():\n    return 1\n"
    r = run_program(code, ["assert f() == 1"], FAST)
    assert r.passed and r.stdout == "hello\n" and r.stderr == "oops\n"


def test_program_can_use_its_working_directory():
    code = ("import os, tempfile\n"
            "def f():\n"
            "    open('data.txt', 'w').write('42')\n"
            "    open('/tmp/x', 'w').write('7')\n"
            "    return [open('data.txt').read(), os.path.isdir(tempfile.mkdtemp()), open('/work/x').read()]\n")
    r = run_program(code, ["assert f() == ['42', True, '7']"], FAST)
    assert r.passed, (r.error, r.stderr)


def test_sandbox_that_cannot_start_raises(monkeypatch):
    broken = dataclasses.replace(launch.interpreter_view(), executable="/nonexistent/python")
    monkeypatch.setattr(launch, "interpreter_view", lambda: broken)  # the harness never runs: not the program's fault
    with pytest.raises(RuntimeError, match="did not start"):
        run_program(ADD, ["assert add(1, 1) == 2"], FAST)


# --- contained programs ------------------------------------------------------------------------------------------


def test_infinite_loop_hits_cpu_limit():
    r = run_program("def f():\n    while True:\n        pass\n", ["assert f() == 1"], FAST)
    assert r.status == "timeout"
    assert_contained(r, FAST.wall_seconds)


def test_sleeping_program_hits_wall_clock_limit():
    limits = SandboxLimits(cpu_seconds=5, wall_seconds=1.5)
    start = time.monotonic()
    r = run_program("import time\ntime.sleep(60)\n", ["assert True"], limits)
    assert r.status == "timeout" and time.monotonic() - start < 3.5
    assert_contained(r, limits.wall_seconds)


def test_fork_bomb_is_refused_by_the_audit_hook():
    r = run_program("import os\nwhile True:\n    os.fork()\n", ["assert True"], FAST)
    assert r.status == "crash" and "os.fork" in r.error
    assert_contained(r, FAST.wall_seconds)


def test_process_cap_counts_the_program_itself():
    # max_procs=5: the program's own process is one of them, so 4 forks succeed and the 5th fails (EAGAIN)
    code = ("import os, time\n"
            "def f():\n"
            "    n = 0\n"
            "    for _ in range(50):\n"
            "        try:\n"
            "            if os.fork() == 0:\n"
            "                time.sleep(5)\n"
            "                os._exit(0)\n"
            "        except OSError:\n"
            "            return n\n"
            "        n += 1\n"
            "    return n\n")
    limits = SandboxLimits(cpu_seconds=2, wall_seconds=4, max_procs=5, allow_subprocess=True)
    r = run_program(code, ["assert f() == 4"], limits)
    assert r.passed, (r.status, r.error)
    assert r.uid is None or live_processes_of(r.uid) == []  # and the 4 sleepers are gone with the run


@pytest.mark.parametrize("code", ["x = bytearray(8 << 30)", "xs = []\nwhile True:\n    xs.append(bytearray(1 << 24))"])
def test_memory_hog_hits_the_memory_limit(code):
    limits = SandboxLimits(cpu_seconds=3, wall_seconds=5, memory_mb=256)
    r = run_program(code, ["assert True"], limits)
    assert r.status == "memory"
    assert_contained(r, limits.wall_seconds)


def test_output_flood_is_cut_off():
    limits = SandboxLimits(cpu_seconds=3, wall_seconds=5, max_output=4096)
    r = run_program("while True:\n    print('x' * 1000)\n", ["assert True"], limits)
    assert r.status == "killed" and "stdout" in r.error and len(r.stdout) == 4096
    assert_contained(r, limits.wall_seconds)


def test_audit_hook_messages():
    cases = [("import ctypes", "ctypes"), ("import subprocess\nsubprocess.run(['true'])", "subprocess.Popen"),
             ("import os\nos.system('true')", "os.system"), ("import os\nos.kill(4242, 9)", "os.kill"),
             ("import socket\nsocket.socket().connect(('127.0.0.1', 1))", "network")]
    for code, word in cases:
        r = run_program(code, ["assert True"], FAST)
        assert r.status == "crash" and word in r.error, (code, r.error)


def test_claimed_layers_are_in_effect():
    # Each probe holds only inside its layer, so a layer that is claimed but absent fails here.
    probes = {
        "namespaces": ["os.getpid() == 1", "os.getuid() == 65534 and os.getgid() == 65534",
                       "open('/proc/self/net/dev').read().count(':') == 1",  # loopback only
                       "len([p for p in os.listdir('/proc') if p.isdigit()]) == 1",  # only itself in its pid namespace
                       "socket.gethostname() == 'sandbox'"],
        "ro-view": ["os.statvfs('/').f_flag & os.ST_RDONLY != 0", "os.statvfs('/work').f_flag & os.ST_RDONLY == 0",
                    "not os.path.exists('/etc') and not os.path.exists('/usr/bin') and not os.path.exists('/home')",
                    "sorted(os.listdir('/work')) == ['solution.py']"],
        "seccomp": ["'Seccomp:\\t2' in open('/proc/self/status').read()",
                    "'NoNewPrivs:\\t1' in open('/proc/self/status').read()"],
        "rlimits": ["resource.getrlimit(resource.RLIMIT_AS) == (256 << 20, 256 << 20)",
                    "resource.getrlimit(resource.RLIMIT_CPU) == (1, 2)",
                    "resource.getrlimit(resource.RLIMIT_NOFILE) == (64, 64)"],
    }
    layers = run_program(ADD, ["assert add(1, 1) == 2"], FAST).layers
    checks = [c for layer in layers for c in probes.get(layer, [])]
    code = ("import os, resource, socket\n"
            "def probe():\n"
            "    return [" + ", ".join(f"bool({c})" for c in checks) + "]\n")
    r = run_program(code, [f"assert probe() == {[True] * len(checks)}"], FAST)
    assert r.passed, (layers, r.error, r.stderr)
    assert {"namespaces", "ro-view", "rlimits", "audit"} <= set(layers)
    if ROOT:  # a fresh host uid and the whole-sandbox cgroups
        assert {"uid", "pids-cgroup", "memory-cgroup"} <= set(layers) and r.uid >= 1 << 30


def test_without_bubblewrap_nothing_runs_unless_asked(monkeypatch, caplog):
    real = launch.find_tool
    monkeypatch.setattr(launch, "find_tool", lambda name: None if name == "bwrap" else real(name))
    monkeypatch.delenv("TETHER_SANDBOX_WEAK", raising=False)
    with pytest.raises(SandboxUnavailable, match="bubblewrap .* not installed.*allow_weak_isolation=True"):
        run_program(ADD, ["assert add(1, 1) == 2"], FAST)
    weak = dataclasses.replace(FAST, allow_weak_isolation=True)
    with caplog.at_level(logging.WARNING, logger="tether.rewards.sandbox"):
        assert run_program(ADD, ["assert add(1, 1) == 2"], weak).passed
        monkeypatch.setenv("TETHER_SANDBOX_WEAK", "1")
        r = run_program(ADD, ["assert add(1, 1) == 3"], FAST)
    assert r.status == "ok" and not r.passed and "weak" in r.layers and "namespaces" not in r.layers
    assert sum("WEAK ISOLATION" in rec.message for rec in caplog.records) == 2  # a warning every run


def test_weak_mode_audit_hook_still_contains(monkeypatch, tmp_path):
    real = launch.find_tool
    monkeypatch.setattr(launch, "find_tool", lambda name: None if name == "bwrap" else real(name))
    limits = dataclasses.replace(FAST, allow_weak_isolation=True)
    os.chmod(tmp_path, 0o777)
    target = tmp_path / "escaped"
    escapes = [
        f"open({str(target)!r}, 'w')",
        # a relative path anchored by a directory descriptor opened outside
        f"import os\nd = os.open({str(tmp_path)!r}, os.O_RDONLY)\nos.open('escaped', os.O_WRONLY | os.O_CREAT, dir_fd=d)",
        # a symlink in the working directory pointing outside
        f"import os\nos.symlink({str(tmp_path)!r}, 'link')\nopen('link/escaped', 'w')",
        # the hook reads nothing the program can patch: not this module's names, not os.path, not builtins
        "import sys, os, builtins\nm = sys.modules['__main__']\n"
        "for k in list(vars(m)):\n    setattr(m, k, lambda *a, **k: None)\n"
        "os.path.realpath = lambda p: '/inside'\nbuiltins.PermissionError = None\n"
        f"open({str(target)!r}, 'w')",
    ]
    for code in escapes:
        r = run_program(code, ["assert True"], limits)
        assert r.status == "crash" and not target.exists(), (code, r.error)
    assert run_program(ADD, ["assert add(1, 1) == 2"], limits).passed


# --- pool and code reward ----------------------------------------------------------------------------------------


def test_run_many_keeps_order_and_bounds_parallelism():
    jobs = [(ADD, [f"assert add({i}, 1) == {i + 1}"]) for i in range(3)] + [(ADD, ["assert add(0, 0) == 1"])]
    results = run_many(jobs, FAST, workers=2)
    assert [r.passed for r in results] == [True, True, True, False]


def test_extract_code_prefers_last_python_fence():
    text = "Draft:\n```python\ndef f(): return 0\n```\nFinal:\n```python\ndef f():\n    return 1\n```\nDone."
    assert extract_code(text) == "def f():\n    return 1"
    assert extract_code("```\nx = 1\n```") == "x = 1"
    assert extract_code("```py\nx = 2\n") == "x = 2"  # generation cut off before the closing fence
    assert extract_code("x = 3") == "x = 3"


def test_code_tests_reward_all_or_nothing_and_partial():
    records = [{"prompt": "p", "tests": ["assert add(1, 2) == 3", "assert add(1, 1) == 3"]}] * 3
    completions = [f"```python\n{ADD}```", "def add(a, b):\n    return 3\n", "I cannot do this."]
    # add(1, 1) == 3 is a wrong test: the real add passes half, the constant 3 passes both
    assert code_tests_reward(["p"] * 3, completions, records, limits=FAST) == [0.0, 1.0, 0.0]
    assert code_tests_reward(["p"] * 3, completions, records, partial=True, limits=FAST) == [0.5, 1.0, 0.0]
    good = [{"prompt": "p", "tests": ["assert add(1, 2) == 3"]}]
    assert code_tests_reward(["p"], [f"```python\n{ADD}```"], good, limits=FAST) == [1.0]


def test_score_is_clamped_and_zero_unless_ok():
    def result(status, n_passed, n_total, passed=False):
        return SandboxResult(passed=passed, n_passed=n_passed, n_total=n_total, status=status)

    # 500 of 1 (what a forged report scored before) clamps to 1.0; a negative count to 0.0
    assert score(result("ok", 500, 1), partial=True) == 1.0
    assert score(result("ok", -3, 2), partial=True) == 0.0
    assert score(result("ok", 1, 0), partial=True) == 0.0  # no tests: nothing was shown
    assert score(result("crash", 2, 2, passed=True)) == 0.0
    assert score(result("ok", 1, 2), partial=True) == 0.5 and score(None) == 0.0


def test_code_tests_reward_scores_contained_programs_zero():
    records = [{"prompt": "p", "tests": ["assert True"]}] * 3
    completions = ["while True:\n    pass", "import os\nos.fork()", "x = bytearray(8 * 1024 ** 3)"]
    assert code_tests_reward(["p"] * 3, completions, records, partial=True, limits=FAST) == [0.0, 0.0, 0.0]


def test_empty_completion_is_not_run_and_missing_tests_raise():
    assert run_completions([""], [{"prompt": "p", "tests": ["assert True"]}], FAST) == [None]
    with pytest.raises(ValueError, match="'tests'"):
        code_tests_reward(["p"], ["x = 1"], [{"prompt": "p"}])
