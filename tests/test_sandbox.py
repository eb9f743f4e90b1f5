"""Sandbox and code reward: correct programs score 1; hostile programs are contained, score 0, end in
bounded time and leave nothing running. Runs as root (kernel layers too) or not (audit hook, rlimits)."""

import os
import socket
import time

import pytest

from tether.rewards.code import code_tests_reward, extract_code, run_completions
from tether.rewards.sandbox import SandboxLimits, run_many, run_program, split_tests

ROOT = os.geteuid() == 0


def _has_cap_sys_admin() -> bool:
    with open("/proc/self/status") as f:
        cap_eff = int(f.read().split("CapEff:")[1].split()[0], 16)
    return bool(cap_eff >> 21 & 1)


KERNEL = ROOT and _has_cap_sys_admin()  # root outside an unprivileged container: namespaces and mounts work
FAST = SandboxLimits(cpu_seconds=1, wall_seconds=3, memory_mb=256, max_procs=8)
ADD = "def add(a, b):\n    return a + b\n"


def _live_leftovers(result) -> list[int]:
    """Live (non-zombie) processes still in the sandbox's process group, of its uid, or inside its workdir."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                state, _ppid, pgrp = f.read().rsplit(")", 1)[1].split()[:3]
            uid = os.stat(f"/proc/{name}").st_uid
            cwd = os.readlink(f"/proc/{name}/cwd") if ROOT else ""
        except OSError:
            continue
        if state == "Z":
            continue
        same_uid = result.uid is not None and uid == result.uid
        if int(pgrp) == result.pid or same_uid or cwd.startswith(result.workdir):
            found.append(int(name))
    return found


def _assert_contained(result, wall_limit: float) -> None:
    assert not result.passed and result.n_passed == 0
    assert result.elapsed < wall_limit + 2.0, result.elapsed
    assert not os.path.exists(result.workdir)
    assert _live_leftovers(result) == []
    cg = os.path.basename(os.path.dirname(result.workdir))
    if os.path.isdir("/sys/fs/cgroup/pids"):
        assert cg not in os.listdir("/sys/fs/cgroup/pids")


# --- test splitting -----------------------------------------------------------------------------------------


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


# --- correct and incorrect programs -------------------------------------------------------------------------


def test_correct_program_passes_all_tests():
    r = run_program(ADD, ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"], FAST)
    assert (r.status, r.passed, r.n_passed, r.n_total) == ("ok", True, 2, 2)
    assert "audit" in r.layers and "rlimits" in r.layers
    assert not os.path.exists(r.workdir)


def test_partial_pass_counts_each_assert():
    r = run_program(ADD, "assert add(1, 2) == 3\nassert add(2, 2) == 5\nassert add(0, 0) == 0", FAST)
    assert (r.status, r.passed, r.n_passed, r.n_total) == ("ok", False, 2, 3)


def test_failing_setup_fails_the_tests_after_it():
    r = run_program(ADD, "assert add(1, 1) == 2\nfrom missing_module import x\nassert add(2, 2) == 4", FAST)
    assert (r.status, r.n_passed, r.n_total) == ("ok", 1, 2)


def test_humaneval_style_check_function():
    tests = "def check(f):\n    assert f(1, 2) == 3\n    assert f(5, 5) == 10\n\ncheck(add)\n"
    assert run_program(ADD, tests, FAST).passed
    assert not run_program("def add(a, b):\n    return a - b\n", tests, FAST).passed


def test_program_that_raises_while_loading_is_a_crash():
    r = run_program("def add(a, b) return a", ["assert add(1, 2) == 3"], FAST)
    assert r.status == "crash" and "SyntaxError" in r.error and r.n_passed == 0
    r = run_program("raise SystemExit(0)", ["assert True"], FAST)
    assert r.status == "crash" and "SystemExit" in r.error


def test_stdout_and_stderr_come_back():
    r = run_program("import sys\nprint('hello')\nprint('oops', file=sys.stderr)", ["assert True"], FAST)
    assert r.passed and r.stdout == "hello\n" and r.stderr == "oops\n"


def test_program_can_use_its_working_directory():
    code = "import tempfile\nopen('data.txt', 'w').write('42')\nt = tempfile.mkdtemp()\n"
    tests = ["assert open('data.txt').read() == '42'", "import os\nassert os.path.isdir(t)"]
    r = run_program(code, tests, FAST)
    assert r.passed, (r.error, r.stderr)


def test_forged_report_without_nonce_is_ignored():
    # write a fake "all passed" report to every open descriptor, then leave before the harness reports
    code = (
        "import os, json\n"
        "fake = json.dumps({'nonce': 'guess', 'results': [True], 'layers': []}).encode() + b'\\n'\n"
        "for fd in map(int, os.listdir('/proc/self/fd')):\n"
        "    try:\n        os.write(fd, fake)\n    except OSError:\n        pass\n"
        "os._exit(0)\n"
    )
    r = run_program(code, ["assert True"], FAST)
    assert r.status == "crash" and not r.passed and "no report" in r.error


def test_sandbox_that_cannot_start_raises(monkeypatch):
    monkeypatch.setattr("sys.executable", "/bin/false")  # the harness never runs: not the program's fault
    with pytest.raises(RuntimeError, match="did not start"):
        run_program(ADD, ["assert add(1, 1) == 2"], FAST)


# --- hostile programs ---------------------------------------------------------------------------------------


def test_infinite_loop_hits_cpu_limit():
    r = run_program("while True:\n    pass\n", ["assert True"], FAST)
    assert r.status == "timeout"
    _assert_contained(r, FAST.wall_seconds)


def test_sleeping_program_hits_wall_clock_limit():
    limits = SandboxLimits(cpu_seconds=5, wall_seconds=1.5)
    start = time.monotonic()
    r = run_program("import time\ntime.sleep(60)\n", ["assert True"], limits)
    assert r.status == "timeout" and time.monotonic() - start < 3.5
    _assert_contained(r, limits.wall_seconds)


def test_fork_bomb_is_refused():
    r = run_program("import os\nwhile True:\n    os.fork()\n", ["assert True"], FAST)
    assert r.status == "crash" and "os.fork" in r.error
    _assert_contained(r, FAST.wall_seconds)


@pytest.mark.skipif(not ROOT, reason="the pids cgroup / uid layers need root")
def test_fork_bomb_held_by_kernel_layers_when_processes_are_allowed():
    # The audit hook lets processes start here, so only the pids cgroup (or RLIMIT_NPROC of the sandbox uid)
    # bounds the bomb, and the sweep must find every process, setsid or not.
    bomb = (
        "import os\nwhile True:\n"
        "    try:\n        os.fork()\n        os.setsid()\n    except OSError:\n        pass"
    )
    limits = SandboxLimits(cpu_seconds=2, wall_seconds=2, max_procs=8, allow_subprocess=True)
    r = run_program(bomb, ["assert True"], limits)
    if not {"pids-cgroup", "nproc"} & set(r.layers):
        pytest.skip("no pids cgroup and no uid switch here: nothing but the audit hook limits processes")
    assert r.status == "timeout"
    _assert_contained(r, limits.wall_seconds)


@pytest.mark.parametrize("code", ["x = bytearray(8 << 30)",
                                  "xs = []\nwhile True:\n    xs.append(bytearray(1 << 24))"])
def test_memory_hog_hits_address_space_limit(code):
    limits = SandboxLimits(cpu_seconds=3, wall_seconds=5, memory_mb=256)
    r = run_program(code, ["assert True"], limits)
    assert r.status == "memory"
    _assert_contained(r, limits.wall_seconds)


def test_write_outside_workdir_is_blocked(tmp_path):
    os.chmod(tmp_path, 0o777)  # writable by anyone: only the sandbox itself stands in the way
    targets = [str(tmp_path / "escaped.txt"), f"/tmp/tether-escape-{os.getpid()}-{time.time_ns()}"]
    code = "".join(f"open({t!r}, 'w').write('x')\n" for t in targets)
    r = run_program(code, ["assert True"], FAST)
    assert r.status == "crash" and "outside the working directory" in r.error
    assert not any(os.path.exists(t) for t in targets)
    _assert_contained(r, FAST.wall_seconds)
    for rename in ["import os\nopen('a', 'w').close()\nos.rename('a', {t!r})", "import os\nos.mkdir({t!r})"]:
        r = run_program(rename.format(t=targets[0]), ["assert True"], FAST)
        assert r.status == "crash" and not os.path.exists(targets[0])


def test_network_connection_never_arrives():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    code = f"import socket\ns = socket.socket()\ns.connect(('127.0.0.1', {port}))\ns.sendall(b'leak')\n"
    try:
        r = run_program(code, ["assert True"], FAST)
        server.settimeout(0.5)
        with pytest.raises(socket.timeout):
            server.accept()
    finally:
        server.close()
    assert r.status == "crash" and "network" in r.error
    _assert_contained(r, FAST.wall_seconds)


def test_output_flood_is_cut_off():
    limits = SandboxLimits(cpu_seconds=3, wall_seconds=5, max_output=4096)
    r = run_program("while True:\n    print('x' * 1000)\n", ["assert True"], limits)
    assert r.status == "killed" and "output" in r.error and len(r.stdout) == 4096
    _assert_contained(r, limits.wall_seconds)


def test_killing_the_parent_fails_and_parent_survives():
    code = "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n"
    r = run_program(code, ["assert True"], FAST)
    assert r.status == "crash" and "os.kill" in r.error
    assert run_program(ADD, ["assert add(2, 3) == 5"], FAST).passed  # this process is alive and still works


def test_ctypes_and_subprocess_are_unavailable():
    cases = [("import ctypes", "_ctypes"), ("import subprocess\nsubprocess.run(['true'])", "processes"),
             ("import os\nos.system('true')", "os.system")]
    for code, word in cases:
        r = run_program(code, ["assert True"], FAST)
        assert r.status == "crash" and word in r.error, (code, r.error)


# A test per layer that passes only inside that layer, so a layer that is claimed but not there fails.
LAYER_PROBES = {
    "netns": ["assert open('/proc/self/net/dev').read().count(':') == 1"],  # loopback only
    "ro-fs": [
        "import os\nassert os.statvfs('/').f_flag & os.ST_RDONLY",
        "import os\nassert not os.statvfs('.').f_flag & os.ST_RDONLY",  # ...but the workdir is writable
        "import os\nassert sorted(os.listdir('/dev')) == "
        "['fd', 'full', 'null', 'random', 'stderr', 'stdin', 'stdout', 'urandom', 'zero']",
    ],
    "caps": ["assert open('/proc/self/status').read().split('CapEff:')[1].split()[0] == '0000000000000000'"],
    "uid": ["import os\nassert os.getuid() != 0 and os.getgroups() == []"],
    "pids-cgroup": ["assert 'tether-sbx-' in open('/proc/self/cgroup').read()"],
    "no-new-privs": ["assert open('/proc/self/status').read().split('NoNewPrivs:')[1].split()[0] == '1'"],
    "rlimits": [
        "import resource\nassert resource.getrlimit(resource.RLIMIT_AS) == (256 << 20, 256 << 20)",
        "import resource\nassert resource.getrlimit(resource.RLIMIT_CPU) == (1, 2)",
    ],
}


def test_claimed_layers_are_in_effect():
    layers = run_program("", ["assert True"], FAST).layers
    tests = [t for layer in layers for t in LAYER_PROBES.get(layer, [])]
    r = run_program("", tests, FAST)
    assert r.status == "ok" and r.n_passed == r.n_total == len(tests), (r.layers, r.stderr)
    assert {"rlimits", "audit", "no-new-privs"} <= set(r.layers)


@pytest.mark.skipif(not KERNEL, reason="namespaces and mounts need root with CAP_SYS_ADMIN")
def test_kernel_layers_are_present_as_root():
    layers = run_program("", ["assert True"], FAST).layers
    assert {"netns", "ro-fs"} <= set(layers)
    assert ("uid" in layers) != ("caps" in layers)  # one way or the other, no privileges left


def test_audit_only_mode_still_contains(tmp_path):
    # no namespaces, cgroup or uid/capability change: the audit hook alone must hold
    limits = SandboxLimits(cpu_seconds=1, wall_seconds=3, kernel_isolation=False)
    os.chmod(tmp_path, 0o777)
    target = tmp_path / "escaped"
    escapes = [
        f"open({str(target)!r}, 'w')",
        # a relative path anchored by a directory descriptor opened outside
        f"import os\nd = os.open({str(tmp_path)!r}, os.O_RDONLY)\n"
        "os.open('escaped', os.O_WRONLY | os.O_CREAT, dir_fd=d)",
        # a symlink in the working directory pointing outside
        f"import os\nos.symlink({str(tmp_path)!r}, 'link')\nopen('link/escaped', 'w')",
    ]
    for code in escapes:
        r = run_program(code, ["assert True"], limits)
        assert r.status == "crash" and "outside the working directory" in r.error, (code, r.error)
        assert not target.exists()
        assert not {"ro-fs", "caps", "uid", "pids-cgroup"} & set(r.layers)
    assert run_program(ADD, ["assert add(1, 1) == 2"], limits).passed


# --- pool and code reward -----------------------------------------------------------------------------------


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


def test_code_tests_reward_scores_contained_programs_zero():
    records = [{"prompt": "p", "tests": ["assert True"]}] * 3
    completions = ["while True:\n    pass", "import os\nos.fork()", "x = bytearray(8 * 1024 ** 3)"]
    assert code_tests_reward(["p"] * 3, completions, records, partial=True, limits=FAST) == [0.0, 0.0, 0.0]


def test_empty_completion_is_not_run_and_missing_tests_raise():
    assert run_completions([""], [{"prompt": "p", "tests": ["assert True"]}], FAST) == [None]
    with pytest.raises(ValueError, match="'tests'"):
        code_tests_reward(["p"], ["x = 1"], [{"prompt": "p"}])
