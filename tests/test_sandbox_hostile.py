"""Hostile programs: each attack the sandbox was beaten with before (issue 18), run as the program under test.

Every one must score 0 and leave the host untouched (the process the test started alive, no byte through the
socket, no file written, nothing of the run left running). Each program is written so that it scores 1 exactly
when its attack works: it returns what only a successful attack could know, or the test expects the forged
answer. The kernel walls are tested with the audit hook off as well (`hook` parameter): they must hold alone.

Needs bubblewrap: where it is missing these tests fail (they do not skip); `bash scripts/install_bwrap.sh`.
"""

import dataclasses
import os
import resource
import shutil
import socket
import subprocess
import sys
import time

import pytest

from tests.test_sandbox import live_processes_of
from tether.rewards.code import code_tests_reward, score
from tether.rewards.sandbox import SandboxLimits, launch, run_program

ROOT = os.geteuid() == 0
LIMITS = SandboxLimits(cpu_seconds=2, wall_seconds=5, memory_mb=256, max_procs=16)
HOOK = pytest.mark.parametrize("hook", [True, False], ids=["hook", "no-hook"])


def limits(hook: bool = True, **changes) -> SandboxLimits:
    """LIMITS with the audit hook on or off; with it off, processes are the kernel's to limit too."""
    return dataclasses.replace(LIMITS, audit_hook=hook, allow_subprocess=not hook, allow_weak_isolation=False,
                               **changes)



def scored_zero(result, wall: float = LIMITS.wall_seconds) -> None:
    """Scored 0 (all-or-nothing and partial), ended in bounded time, nothing of it left: no process of its uid,
    no host directory, no cgroup."""
    assert score(result) == 0.0 and score(result, partial=True) == 0.0, result
    assert result.elapsed < wall + 2.0, result.elapsed
    assert not os.path.exists(result.host_dir)
    assert not [r for r, dirs, _ in os.walk("/sys/fs/cgroup") if os.path.basename(result.host_dir) in dirs]
    if result.uid is not None:
        assert live_processes_of(result.uid) == []


@pytest.fixture(autouse=True)
def kernel_isolation_or_nothing(monkeypatch):
    """Never run these programs without bubblewrap: bare, as root, `os.kill(-1, SIGKILL)` ends every process on
    the machine. So weak mode is switched off here and a missing bwrap fails each test before anything runs."""
    monkeypatch.delenv("TETHER_SANDBOX_WEAK", raising=False)
    if not launch.find_tool("bwrap"):
        pytest.fail("bubblewrap is missing: run `bash scripts/install_bwrap.sh` (CI does); these tests never skip")


@pytest.fixture
def sleeper():
    proc = subprocess.Popen(["sleep", "60"])
    yield proc
    proc.kill()
    proc.wait()


# --- the guard -----------------------------------------------------------------------------------------------


def test_guard_patch_does_not_turn_the_audit_hook_off():
    # The one line that turned the old guard off, and its equivalents now: every name of the harness module,
    # os.path, and the builtins the hook raises. If any of them reached the hook, fork would work and f pass.
    code = (
        "import builtins, os, sys\n"
        "def f():\n"
        "    sys.modules.setdefault('__tether_sandbox__', type(sys)('x'))._deny = lambda w: None\n"
        "    m = sys.modules['__main__']\n"
        "    for k in list(vars(m)):\n"
        "        if not k.startswith('__'):\n"
        "            setattr(m, k, lambda *a, **k: None)\n"
        "    os.path.realpath = lambda p: '/work'\n"
        "    builtins.PermissionError = builtins.isinstance = None\n"
        "    try:\n"
        "        if os.fork() == 0:\n"
        "            os._exit(0)\n"
        "        print('FORKED', flush=True)\n"
        "    except BaseException as e:\n"
        "        print('BLOCKED', e, flush=True)\n"
        "    return 'forked'\n"
    )
    r = run_program(code, ["assert f() == 'forked'"], limits(hook=True))
    # the harness itself is broken by now (its names are gone), which also scores 0; stdout says the hook held
    assert r.stdout.startswith("BLOCKED sandbox: os.fork is not allowed"), r.stdout
    scored_zero(r)


# --- the host's processes, sockets, files and /proc ------------------------------------------------------------


@HOOK
def test_cannot_kill_a_host_process(sleeper, hook):
    code = (
        "import os, signal\n"
        "def f():\n"
        f"    os.kill({sleeper.pid}, signal.SIGKILL)\n"
        "    try:\n        os.kill(-1, signal.SIGKILL)\n    except OSError:\n        pass\n"
        "    return 'killed'\n"
    )
    r = run_program(code, ["assert f() == 'killed'"], limits(hook))
    scored_zero(r)
    time.sleep(0.1)
    assert sleeper.poll() is None  # still running


@HOOK
def test_cannot_reach_a_root_owned_unix_socket(tmp_path, hook):
    os.chmod(tmp_path, 0o777)
    path = str(tmp_path / "root.sock")
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    os.chmod(path, 0o777)  # anyone may connect: only the sandbox stands in the way
    server.listen()
    abstract = socket.socket(socket.AF_UNIX)  # abstract sockets belong to the network namespace, not a path
    name = f"\0tether-test-{os.getpid()}-{time.time_ns()}"
    abstract.bind(name)
    abstract.listen()
    code = (
        "import socket\n"
        "def f():\n"
        "    sent = 0\n"
        f"    for address in ({path!r}, {name!r}):\n"
        "        try:\n"
        "            s = socket.socket(socket.AF_UNIX)\n"
        "            s.connect(address)\n"
        "            sent += s.send(b'leak')\n"
        "        except OSError:\n"
        "            pass\n"
        "    return sent\n"
    )
    try:
        r = run_program(code, ["assert f() == 8"], limits(hook))
        for s in (server, abstract):
            s.settimeout(0.3)
            with pytest.raises(socket.timeout):
                s.accept()
    finally:
        server.close()
        abstract.close()
    scored_zero(r)


@HOOK
def test_cannot_read_a_0600_file_or_shadow(tmp_path, hook):
    secret = tmp_path / "secret"
    secret.write_text("s3cr3t")
    os.chmod(secret, 0o600)
    shadow = open("/etc/shadow").read() if os.access("/etc/shadow", os.R_OK) else "unreadable"
    code = (
        "def read(path):\n"
        "    try:\n        return open(path).read()\n    except OSError as e:\n        return str(e)\n"
        f"def f():\n    return read({str(secret)!r})\n"
        f"def g():\n    return read('/proc/1/root' + {str(secret)!r})\n"  # through another process's root
        "def h():\n    return read('/etc/shadow')\n"
    )
    tests = ["assert f() == 's3cr3t'", "assert g() == 's3cr3t'", f"assert h() == {shadow!r}"]
    r = run_program(code, tests, limits(hook))
    assert r.status == "ok" and r.verdicts == (False, False, False)
    scored_zero(r)


@HOOK
def test_cannot_read_host_proc(hook):
    marker = f"tether-marker-{time.time_ns()}"
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", marker])
    code = (
        "import os\n"
        "def f():\n"
        "    seen = []\n"
        "    for p in os.listdir('/proc'):\n"
        "        try:\n"
        "            seen.append(open(f'/proc/{p}/cmdline').read())\n"
        "        except OSError:\n"
        "            pass\n"
        f"    return any({marker!r} in c for c in seen)\n"
    )
    try:
        r = run_program(code, ["assert f() is True"], limits(hook))
    finally:
        other.kill()
        other.wait()
    assert r.status == "ok" and r.verdicts == (False,)
    scored_zero(r)


@HOOK
def test_setsid_daemon_does_not_survive_the_run(tmp_path, hook):
    # The daemon would write to a host file for 3 s after the run; f reports whether the host file appeared.
    os.chmod(tmp_path, 0o777)
    target = tmp_path / "daemon.txt"
    code = (
        "import os, time\n"
        "def f():\n"
        "    try:\n"
        "        if os.fork() == 0:\n"
        "            os.setsid()\n"
        "            if os.fork() == 0:\n"
        "                for _ in range(300):\n"
        "                    try:\n"
        f"                        open({str(target)!r}, 'a').write('x')\n"
        "                    except OSError:\n"
        "                        pass\n"
        "                    time.sleep(0.01)\n"
        "            os._exit(0)\n"
        "    except OSError:\n"
        "        pass\n"
        "    time.sleep(0.2)\n"
        f"    return os.path.exists({str(target)!r})\n"
    )
    r = run_program(code, ["assert f() is True"], limits(hook))
    scored_zero(r)
    time.sleep(0.5)
    assert not target.exists()
    assert r.uid is None or live_processes_of(r.uid) == []  # ps-free: a /proc scan for the run's uid
    out = subprocess.run(["ps", "-eo", "uid="], capture_output=True, text=True).stdout.split() if ROOT else []
    assert str(r.uid) not in out


@pytest.mark.skipif(not ROOT, reason="finding the run's processes afterwards needs its fresh uid (root)")
def test_nothing_survives_the_trainer_being_killed():
    # A trainer (a child python here) runs a program that starts a setsid daemon and sleeps; the trainer is
    # SIGKILLed mid-run. bubblewrap's parent-death signal must take the sandbox, daemon included, with it.
    script = (
        "import shutil\n"
        "from tether.rewards.sandbox import SandboxLimits, launch, run_program\n"
        "fresh, make = launch.fresh_uid, launch.make_cgroups\n"
        "def noted_uid():\n    uid = fresh()\n    print('uid', uid, flush=True)\n    return uid\n"
        "def noted_cgroups(name, *a):\n    print('name', name, flush=True)\n    return make(name, *a)\n"
        "launch.fresh_uid, launch.make_cgroups = noted_uid, noted_cgroups\n"
        "code = 'import os, time\\nif os.fork() == 0:\\n    os.setsid()\\n    time.sleep(60)\\ntime.sleep(60)\\n'\n"
        "run_program(code, ['assert f() == 1'], SandboxLimits(wall_seconds=60, cpu_seconds=60, allow_subprocess=True))\n"
    )
    trainer = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    noted = dict(trainer.stdout.readline().split() for _ in range(2))
    uid = int(noted["uid"])
    deadline = time.monotonic() + 10
    while len(live_processes_of(uid)) < 3 and time.monotonic() < deadline:  # bwrap, the harness, the daemon
        time.sleep(0.05)
    assert len(live_processes_of(uid)) >= 3
    trainer.kill()
    trainer.wait()
    deadline = time.monotonic() + 5
    while live_processes_of(uid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert live_processes_of(uid) == []
    # what a killed trainer does leave: its empty cgroups and /tmp directory (no process in them)
    for root, dirs, _ in list(os.walk("/sys/fs/cgroup")):
        if noted["name"] in dirs:
            os.rmdir(os.path.join(root, noted["name"]))
    shutil.rmtree(os.path.join("/tmp", noted["name"]), ignore_errors=True)


@HOOK
def test_cannot_write_outside_the_work_dir(tmp_path, hook):
    os.chmod(tmp_path, 0o777)
    targets = [str(tmp_path / "escaped.txt"), f"/tmp/tether-escape-{os.getpid()}-{time.time_ns()}", "/escaped",
               "/usr/escaped", "/sandbox/harness.py"]
    code = (
        "def f():\n"
        "    wrote = []\n"
        f"    for t in {targets!r}:\n"
        "        try:\n"
        "            open(t, 'a').write('x')\n"
        "            wrote.append(t)\n"
        "        except OSError:\n"
        "            pass\n"
        "    return wrote\n"
    )
    r = run_program(code, [f"assert f() == {targets[:2]!r}"], limits(hook))
    scored_zero(r)
    assert not any(os.path.exists(t) for t in targets[:2])


@HOOK
def test_network_call_never_arrives(hook):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    code = (
        "import socket\n"
        "def f():\n"
        "    try:\n"
        f"        s = socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
        "        return s.send(b'leak')\n"
        "    except OSError as e:\n"
        "        try:\n"
        "            return socket.gethostbyname('example.com')\n"
        "        except OSError:\n"
        "            return str(e)\n"
    )
    try:
        r = run_program(code, ["assert f() == 4"], limits(hook))
        server.settimeout(0.3)
        with pytest.raises(socket.timeout):
            server.accept()
    finally:
        server.close()
    scored_zero(r)


@HOOK
def test_no_ctypes_and_no_shell(hook):
    code = (
        "import os\n"
        "def via_ctypes():\n"
        "    try:\n"
        "        import ctypes\n"
        "        return ctypes.CDLL(None).getuid()\n"
        "    except Exception as e:\n"
        "        pass\n"
        "    try:\n"  # the path that worked before: load _ctypes from its file directly
        "        import importlib.util, sysconfig, glob\n"
        "        path = glob.glob(sysconfig.get_config_var('DESTSHARED') + '/_ctypes*.so')[0]\n"
        "        spec = importlib.util.spec_from_file_location('_ctypes', path)\n"
        "        m = importlib.util.module_from_spec(spec)\n"
        "        return m.dlopen(None)\n"
        "    except Exception as e:\n"
        "        return repr(e)\n"
        "def via_shell():\n"
        "    try:\n"
        "        return os.system('id')\n"
        "    except Exception as e:\n"
        "        return repr(e)\n"
    )
    r = run_program(code, ["assert via_ctypes() == 0", "assert via_shell() == 0"], limits(hook))
    assert r.status == "ok" and r.verdicts == (False, False)
    scored_zero(r)


# --- resources ---------------------------------------------------------------------------------------------------


def test_infinite_loop_and_memory_hog():
    for code, status in (("def f():\n    while True:\n        pass\n", "timeout"),
                         ("def f():\n    return len(bytearray(8 << 30))\n", "memory")):
        r = run_program(code, ["assert f() == 8 << 30"], LIMITS)
        assert r.status == status
        scored_zero(r)


@pytest.mark.skipif(not ROOT, reason="a memory cap on the whole sandbox is a memory cgroup, which needs root")
def test_processes_together_over_the_memory_limit():
    # 3 processes of 150 MB each fit RLIMIT_AS (256 MB each) but not the sandbox's 256 MB together
    code = (
        "import os, time\n"
        "def f():\n"
        "    pids = []\n"
        "    for _ in range(3):\n"
        "        pid = os.fork()\n"
        "        if pid == 0:\n"
        "            x = bytearray(150 << 20)\n"
        "            for i in range(0, len(x), 4096):\n"
        "                x[i] = 1\n"
        "            time.sleep(1)\n"
        "            os._exit(0)\n"
        "        pids.append(pid)\n"
        "    return [os.waitpid(p, 0)[1] for p in pids]\n"
    )
    r = run_program(code, ["assert f() == [0, 0, 0]"], limits(hook=False))
    assert "memory-cgroup" in r.layers and r.status == "memory"
    scored_zero(r)


@HOOK
def test_fork_bomb(hook):
    bomb = (
        "import os, time\n"
        "def f():\n"
        "    n = 0\n"
        "    while n < 1000:\n"
        "        try:\n"
        "            if os.fork() == 0:\n"
        "                os.setsid()\n"
        "                time.sleep(30)\n"
        "                os._exit(0)\n"
        "            n += 1\n"
        "        except OSError:\n"
        "            break\n"
        "    return n\n"
    )
    r = run_program(bomb, ["assert f() == 1000"], limits(hook))
    scored_zero(r)
    # and the classic, at load time: the processes cap holds it, the wall clock ends it
    r = run_program("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
                    ["assert True"], limits(hook, wall_seconds=2))
    assert r.status in ("timeout", "crash")
    scored_zero(r, wall=2)


@pytest.mark.parametrize("stream", ["report", "stdout", "stderr"])
def test_one_gigabyte_flood_does_not_grow_the_parent(stream):
    # The report fd is whichever pipe the harness holds: the program writes to every descriptor above 2.
    fds = "[1]" if stream == "stdout" else "[2]" if stream == "stderr" else \
        "[int(x) for x in os.listdir('/proc/self/fd') if int(x) > 2]"
    code = (
        "import os\n"
        "def f():\n"
        "    chunk = b'{\"i\": 0, \"v\": 1}\\n' * 4096\n"
        f"    for fd in {fds}:\n"
        "        try:\n"
        "            for _ in range((1 << 30) // len(chunk)):\n"
        "                os.write(fd, chunk)\n"
        "        except OSError:\n"
        "            pass\n"
        "    return 1\n"
    )
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    r = run_program(code, ["assert f() == 1"], LIMITS)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert r.status == "killed" and stream in r.error and grown_mb < 64, (r.status, r.error, grown_mb)
    scored_zero(r)


# --- forged verdicts -------------------------------------------------------------------------------------------


ALWAYS_EQUAL = (
    "class Yes:\n"
    "    def __eq__(self, other):\n        return True\n"
    "    __ne__ = __lt__ = __le__ = __gt__ = __ge__ = __contains__ = lambda self, other: True\n"
    "    __hash__ = object.__hash__\n"
    "class Int(int):\n"
    "    def __eq__(self, other):\n        return True\n"
    "    __hash__ = int.__hash__\n"
)


def test_always_equal_return_values():
    tests = ["assert f(1) == 2", "assert g(1) == 2", "assert [f(1)] == [2]",
             "def check(candidate):\n    assert candidate(1) == 2\n\ncheck(f)\n"]
    code = ALWAYS_EQUAL + "def f(x):\n    return Yes()\ndef g(x):\n    return Int(5)\n"
    for t in tests:
        r = run_program(code, [t], LIMITS)
        assert r.verdicts in ((False,), ()), (t, r)
        scored_zero(r)


def test_patched_exec_compile_and_stripped_asserts():
    patches = [
        "import builtins\nbuiltins.exec = builtins.eval = lambda *a, **k: None\n",
        "import builtins\nbuiltins.compile = lambda *a, **k: None\n",
        # every compile from now on with optimize=2: asserts vanish from whatever it compiles
        "import builtins, functools\nbuiltins.compile = functools.partial(builtins.compile, optimize=2)\n",
    ]
    wrong = "def add(a, b):\n    return a - b\n"
    tests = ["assert add(1, 2) == 3\nassert add(2, 2) == 4",
             "def check(candidate):\n    assert candidate(1, 2) == 3\n\ncheck(add)\n"]
    for patch in patches:
        for t in tests:
            r = run_program(patch + wrong, t, LIMITS)
            scored_zero(r)


def test_stack_walk_forgery_of_the_report():
    # Walk up to the harness's frames, find its report object and every descriptor, and write a report that
    # says everything passed (the old format and anything the new parent might read), then leave.
    code = (
        "import os, sys, json\n"
        "def add(a, b):\n"
        "    lines = [{'results': [True] * 9, 'passed': True, 'n_passed': 500, 'verdicts': [True] * 9,\n"
        "              'nonce': 'x', 'layers': []}, {'done': True}, {'loaded': True}]\n"
        "    lines += [{'i': i, 'v': True} for i in range(9)] + [{'i': i, 'ok': True} for i in range(9)]\n"
        "    data = b''.join(json.dumps(l).encode() + b'\\n' for l in lines)\n"
        "    frame = sys._getframe()\n"
        "    while frame:\n"
        "        for v in list(frame.f_locals.values()):\n"
        "            if hasattr(v, 'send') and hasattr(v, 'fd'):\n"
        "                for l in lines:\n"
        "                    v.send(l)\n"
        "        frame = frame.f_back\n"
        "    for fd in map(int, os.listdir('/proc/self/fd')):\n"
        "        try:\n"
        "            os.write(fd, data)\n"
        "        except OSError:\n"
        "            pass\n"
        "    os._exit(0)\n"
    )
    for tests in ("assert add(1, 2) == 3\nassert add(2, 2) == 4",
                  "def check(candidate):\n    assert candidate(1, 2) == 3\n\ncheck(add)\n"):
        r = run_program(code, tests, LIMITS)
        scored_zero(r)
    records = [{"prompt": "p", "tests": "assert add(1, 2) == 3"}]
    assert code_tests_reward(["p"], [code], records, partial=True, limits=LIMITS) == [0.0]


def test_malformed_reports_score_zero_without_raising():
    junk = [b'{"results": 123}', b'{"i": 0, "v": {"tuple": 5}}', b'{"i": 0, "v": {"set": [[1]]}}',
            b'{"i": "0", "v": 3}', b"[" * 200_000, b'{"i": 0, "v": ' + b"9" * 10_000 + b"}", b"\xff\xfe\x00",
            b'{"i": 0, "v": NaN}', b"not json at all"]
    code = (
        "import os\n"
        "def add(a, b):\n"
        f"    junk = {junk!r}\n"
        "    for fd in map(int, os.listdir('/proc/self/fd')):\n"
        "        if fd > 2:\n"
        "            for j in junk:\n"
        "                try:\n"
        "                    os.write(fd, j + b'\\n')\n"
        "                except OSError:\n"
        "                    pass\n"
        "    os._exit(0)\n"
    )
    for tests in ("assert add(1, 2) == 3", "def check(candidate):\n    assert candidate(1, 2) == 3\n\ncheck(add)\n"):
        r = run_program(code, tests, LIMITS)
        scored_zero(r)


# --- and correct programs still pass ----------------------------------------------------------------------------


@HOOK
def test_correct_programs_still_pass(hook):
    add = "def add(a, b):\n    return a + b\n"
    for code, tests in [
        (add, ["assert add(1, 2) == 3", "assert add('a', 'b') == 'ab'", "assert add((1,), (2,)) == (1, 2)"]),
        (add, "def check(candidate):\n    for i in range(20):\n        assert candidate(i, i) == 2 * i\n\ncheck(add)\n"),
        ("print(sum(map(int, input().split())))", [{"input": "2 3\n", "output": "5\n"}]),
    ]:
        r = run_program(code, tests, limits(hook))
        assert r.passed and score(r) == 1.0, (tests, r.error, r.stderr)
