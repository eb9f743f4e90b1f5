"""The inside of a sandbox: a stdlib-only script that sets the limits, runs the program and reports plain data.

    python -I -S -B harness.py JOB        # what the parent starts inside bubblewrap (or bare, in weak mode)

Modes (JOB["mode"]); only the judge decides verdicts, and it never holds program code:
  calls   load the program, run the tests' setup statements, evaluate each call expression; report its value
  io      run the program once per stdin input in a fresh forked process; report what it printed
  serve   load the program, then answer calls relayed by the parent (for a judge running elsewhere)
  judge   a separate sandbox with no program in it: run the dataset's tests with the program's functions replaced
          by proxies whose results arrive as data; report a verdict per test
Expected values never reach the first three modes, so the program has nothing to forge them from. Every line written to the report fd is one JSON object built by `encode` from plain builtins
(exact types, no subclasses), so an object whose __eq__ always says True cannot come back at all.

The parent imports this module for the same codec; it imports nothing from tether and only small stdlib modules.
"""

import os
import resource
import sys

MAX_DEPTH = 64  # nesting of an encoded value (a self-referencing list stops here)
_INF = float("inf")


class Unencodable(ValueError):
    """A value that is not plain data (or nested too deeply): it cannot leave the sandbox."""


# ------------------------------------------------------------------------------------------------------------
# The codec: plain builtins <-> JSON. Tagged one-key objects keep Python's equality (a tuple is not a list).
# ------------------------------------------------------------------------------------------------------------


def encode(value, depth: int = 0):
    """A JSON-able form of `value` built only from exact builtin types; raises Unencodable for anything else."""
    t = type(value)
    if value is None or t is bool or t is int or t is str:
        return value
    if t is float:
        return {"float": repr(value)} if value != value or value in (_INF, -_INF) else value
    if depth >= MAX_DEPTH:
        raise Unencodable("nested too deeply")
    if t is list:
        return [encode(v, depth + 1) for v in value]
    if t is tuple or t is set or t is frozenset:
        return {t.__name__: [encode(v, depth + 1) for v in value]}
    if t is dict:
        return {"dict": [[encode(k, depth + 1), encode(v, depth + 1)] for k, v in value.items()]}
    if t is bytes:
        return {"bytes": value.hex()}
    if t is complex:
        return {"complex": [encode(value.real), encode(value.imag)]}
    raise Unencodable(f"{t.__name__} is not plain data")


def decode(obj, depth: int = 0):
    """The value `encode` made `obj` from; raises ValueError or TypeError (unhashable set items) when it is not one."""
    t = type(obj)
    if obj is None or t is bool or t is int or t is str or t is float:
        return obj
    if depth >= MAX_DEPTH:
        raise ValueError("nested too deeply")
    if t is list:
        return [decode(v, depth + 1) for v in obj]
    if t is not dict or len(obj) != 1:
        raise ValueError("not an encoded value")
    ((tag, body),) = obj.items()
    if tag == "float" and body in ("nan", "inf", "-inf"):
        return float(body)
    if tag == "bytes" and type(body) is str:
        return bytes.fromhex(body)
    if type(body) is not list:
        raise ValueError(f"bad {tag!r} body")
    items = [decode(v, depth + 1) for v in body]
    if tag in ("tuple", "set", "frozenset"):
        return {"tuple": tuple, "set": set, "frozenset": frozenset}[tag](items)
    if tag == "complex" and len(items) == 2 and all(type(x) in (int, float) for x in items):
        return complex(*items)
    if tag == "dict" and all(type(pair) is list and len(pair) == 2 for pair in items):
        return dict(items)
    raise ValueError(f"bad encoded value {tag!r}")


def _no_constants(name: str):
    raise ValueError(f"{name} is not JSON")  # NaN/Infinity travel tagged, never as bare constants


def _not_json(obj):
    raise TypeError(f"{type(obj).__name__} is not JSON")


def _codec():
    """(loads, dumps) on the C accelerator alone: importing `json` pulls in `re` and `enum`, ~12 ms of every
    sandbox start. Falls back to `json` where `_json` differs from what CPython 3.10-3.13 provide."""
    try:
        import _json

        class Ctx:  # what _json.make_scanner reads from a json.JSONDecoder
            strict, object_hook, object_pairs_hook = True, None, None
            parse_float, parse_int, parse_constant = float, int, staticmethod(_no_constants)

        scan = _json.make_scanner(Ctx())
        encoder = _json.make_encoder(None, _not_json, _json.encode_basestring_ascii, None, ":", ",", False, False,
                                     False)

        def loads(data):
            text = (data.decode() if isinstance(data, (bytes, bytearray)) else data).strip()
            try:
                value, end = scan(text, 0)
            except StopIteration:
                raise ValueError("not JSON") from None
            if end != len(text):
                raise ValueError("extra data after the JSON value")
            return value

        def dumps(obj) -> bytes:
            return "".join(encoder(obj, 0)).encode() + b"\n"

        probe = {"a": [1, 2.5, "\u00e9", None, True, {"b": []}]}
        if loads(dumps(probe)) == probe:
            return loads, dumps
    except Exception:
        pass
    import json

    return (lambda data: json.loads(data, parse_constant=_no_constants),
            lambda obj: json.dumps(obj, separators=(",", ":"), allow_nan=False).encode() + b"\n")


loads, dumps = _codec()  # strict JSON: no NaN/Infinity; ints past Python's digit limit raise ValueError


# ------------------------------------------------------------------------------------------------------------
# Limits and the audit hook (defence in depth: the kernel walls are bubblewrap's, outside this process)
# ------------------------------------------------------------------------------------------------------------


def set_limits(lim: dict) -> None:
    """Soft = hard for every limit (the program cannot raise them back), except CPU: SIGXCPU, SIGKILL 1 s later.

    RLIMIT_NPROC is set here, inside the sandbox's user namespace, because the kernel counts it per user there.
    """
    settings = {
        resource.RLIMIT_CPU: (lim["cpu"], lim["cpu"] + 1),
        resource.RLIMIT_AS: (lim["as"], lim["as"]),
        resource.RLIMIT_FSIZE: (lim["fsize"], lim["fsize"]),
        resource.RLIMIT_NOFILE: (lim["nofile"], lim["nofile"]),
        resource.RLIMIT_CORE: (0, 0),
    }
    if lim.get("nproc"):
        settings[resource.RLIMIT_NPROC] = (lim["nproc"], lim["nproc"])
    for which, value in settings.items():
        resource.setrlimit(which, value)


_PROCESS_EVENTS = frozenset({"os.fork", "os.forkpty", "os.system", "os.exec", "os.posix_spawn", "os.spawn",
                             "subprocess.Popen", "pty.spawn"})
_NETWORK_EVENTS = frozenset({"socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg",
                             "socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr",
                             "socket.getnameinfo", "socket.sethostname"})
# event -> positions of the path arguments that get written, created or changed
_WRITE_EVENTS = {
    "os.remove": (0,), "os.rmdir": (0,), "os.mkdir": (0,), "os.rename": (0, 1), "os.link": (1,),
    "os.symlink": (1,), "os.truncate": (0,), "os.chmod": (0,), "os.chown": (0,), "os.utime": (0,),
    "os.setxattr": (0,), "os.removexattr": (0,), "sqlite3.connect": (0,),
}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
# native code would go around every check; gc walks would find this hook's closure
_BLOCKED = frozenset({"ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata", "gc.get_objects", "gc.get_referrers",
                      "gc.get_referents", "os.kill", "os.killpg", "signal.pthread_kill"})
_NATIVE_IMPORTS = frozenset({"_ctypes", "ctypes", "_cffi_backend"})


def install_audit_hook(workdir: str, allow_subprocess: bool) -> None:
    """An audit hook that can never be removed and reads nothing the program can reach.

    Every name the hook uses is bound now, into its closure and defaults: patching this module, `os.path` or
    builtins afterwards changes nothing it decides (the attack on the previous design, `_deny = lambda w: None`,
    has no target). The closure itself is out of reach: the gc walks that could find it are blocked.
    """
    home = os.path.realpath(workdir)
    me = os.getpid()
    write_events = dict(_WRITE_EVENTS)  # a copy in the closure: the module's dict may be changed, not this one

    def inside(path, _realpath=os.path.realpath, _readlink=os.readlink, _fsdecode=os.fsdecode,
               _fspath=os.fspath, _int=int, _isinstance=isinstance, _sep=os.sep) -> bool:
        if path is None:
            return True
        try:
            real = _readlink(f"/proc/self/fd/{path}") if _isinstance(path, _int) else _realpath(_fsdecode(_fspath(path)))
        except (OSError, TypeError, ValueError):
            return False
        if not real.startswith("/"):
            return True  # pipe:[...], socket:[...], anon_inode:...
        return real == home or real.startswith(home + _sep) or real == "/dev/null"

    def hook(event, args, _inside=inside, _isdir=os.path.isdir, _isinstance=isinstance, _int=int, _any=any,
             _len=len, _deny=PermissionError, _unix=1,  # AF_UNIX on Linux
             _write_flags=_WRITE_FLAGS, _procs=_PROCESS_EVENTS,
             _net=_NETWORK_EVENTS, _blocked=_BLOCKED, _native=_NATIVE_IMPORTS, _allow=bool(allow_subprocess)):
        if event == "open":
            path, mode, flags = args
            writes = (mode and _any(c in mode for c in "wax+")) or (flags or 0) & _write_flags
            # the event does not carry dir_fd, so no directory outside may open (it could anchor a relative path)
            if (writes or (not _isinstance(path, _int) and _isdir(path))) and not _inside(path):
                raise _deny(f"sandbox: opening {path!r} for writing or as a directory outside {home}")
        elif event in write_events:
            for i in write_events[event]:
                if i < _len(args) and not _inside(args[i]):
                    raise _deny(f"sandbox: {event} on {args[i]!r} outside {home}")
        elif event == "import" and args[0] in _native:
            raise _deny(f"sandbox: importing {args[0]} is not allowed")
        elif event == "socket.__new__" and args[1] != _unix:
            raise _deny(f"sandbox: a socket of family {args[1]} (network) is not allowed")
        elif event in _net or (event in _procs and not _allow):
            raise _deny(f"sandbox: {event} is not allowed")
        elif event in _blocked and not (event in ("os.kill", "os.killpg") and args[0] in (me, 0)):
            raise _deny(f"sandbox: {event} is not allowed")

    sys.addaudithook(hook)


# ------------------------------------------------------------------------------------------------------------
# Modes
# ------------------------------------------------------------------------------------------------------------


class _Report:
    """One JSON line per message on the report fd; a value too large to send becomes an error, not a flood."""

    def __init__(self, fd: int, max_line: int):
        self.fd, self.max_line = fd, max_line

    def send(self, obj, substitute: bool = True) -> bool:
        """Write `obj`; one too large becomes {"e": "value too large"} (or, without `substitute`, nothing: False)."""
        data = dumps(obj)
        if len(data) > self.max_line:
            if not substitute:
                return False
            data = dumps({k: v for k, v in obj.items() if k in ("i", "memory")} | {"e": "value too large"})
        while data:
            data = data[os.write(self.fd, data):]
        return True

    def value(self, i: int | None, thunk) -> dict:
        """{"v": encoded result of thunk()} or {"e": why not}; MemoryError also sets "memory"."""
        msg = {} if i is None else {"i": i}
        try:
            msg["v"] = encode(thunk())
        except MemoryError:
            msg.update(e="MemoryError", memory=True)
        except BaseException as e:  # SystemExit included: nothing the program raises escapes the harness
            msg["e"] = _describe(e)
        return msg


def _describe(e: BaseException) -> str:
    try:
        return f"{type(e).__name__}: {e}"[:300]
    except BaseException:  # a hostile __str__
        return "error"


def _load(code: str, name: str) -> tuple[dict | None, dict]:
    """Run the program as a module called `name`; (namespace, {}) or (None, the report of why it failed)."""
    import builtins

    ns = {"__name__": name, "__file__": "solution.py", "__builtins__": builtins}
    try:
        exec(compile(code, "solution.py", "exec"), ns)
    except MemoryError:
        return None, {"memory": True, "load_error": "MemoryError"}
    except BaseException as e:
        return None, {"load_error": _describe(e)}
    return ns, {}


def run_calls(job: dict, out: _Report, ns: dict) -> None:
    """Setup statements run in order (one failing skips every call after it); each call is evaluated and sent."""
    broken = False
    for i, (kind, source) in enumerate(job["units"]):
        if broken:
            out.send({"i": i, "skip": True})
        elif kind == "setup":
            msg = out.value(i, lambda s=source, n=i: exec(compile(s, f"<test {n}>", "exec"), ns))
            broken = "e" in msg
            out.send({"i": i, "ok": True} if not broken else msg)
        else:
            out.send(out.value(i, lambda s=source, n=i: eval(compile(s, f"<test {n}>", "eval"), ns)))


def run_serve(job: dict, out: _Report, ns: dict) -> None:
    """Answer {"call": name, "args", "kwargs"} lines from the request fd until it closes."""
    for line in _lines(job["request_fd"], job["max_line"]):
        try:
            req = loads(line)
            fn, args, kwargs = ns[req["call"]], decode(req["args"]), decode(req["kwargs"])
        except BaseException as e:
            out.send({"e": "bad request: " + _describe(e)})
            continue
        out.send(out.value(None, lambda fn=fn, args=args, kwargs=kwargs: fn(*args, **kwargs)))


def _lines(fd: int, max_line: int):
    """Complete lines read from `fd` until EOF; a line past `max_line` ends the stream."""
    buf = b""
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:
            return
        buf += chunk
        *lines, buf = buf.split(b"\n")
        yield from lines
        if len(buf) > max_line:
            return


def run_judge(job: dict, out: _Report) -> None:
    """Run the dataset's test units with proxies for the program's names; a test passes when it raises nothing."""
    import builtins
    import importlib

    requests = _lines(job["request_fd"], job["max_line"])
    ns = {"__name__": "__judge__", "__builtins__": builtins}
    for name in job["modules"]:
        try:
            ns[name] = importlib.import_module(name)
        except BaseException:
            pass
    for name in job["proxies"]:
        ns[name] = _proxy(name, out, requests)
    verdicts, broken = [], False
    for i, (kind, source) in enumerate(job["units"]):
        ok = False
        if not broken:
            try:
                exec(compile(source, f"<test {i}>", "exec"), ns)
                ok = True
            except BaseException:
                pass
        if kind == "test":
            verdicts.append(ok)
        elif not ok:
            broken = True
    out.send({"verdicts": verdicts})


class ProgramError(Exception):
    """What a proxied call raises in the judge when the program raised, returned non-data, or went away."""


def _proxy(name: str, out: _Report, requests):
    def call(*args, **kwargs):
        if not out.send({"call": name, "args": encode(list(args)), "kwargs": encode(kwargs)}, False):
            raise ProgramError("arguments too large to send")
        line = next(requests, None)
        if line is None:
            raise ProgramError("the program is gone")
        reply = loads(line)
        if type(reply) is not dict or "v" not in reply:
            raise ProgramError(str(reply.get("e", "no value") if type(reply) is dict else "bad reply")[:300])
        return decode(reply["v"])

    call.__name__ = call.__qualname__ = name
    return call


def run_io(job: dict, out: _Report) -> None:
    """Each stdin input in a fresh process (forked before any program code runs here); report stdout and exit."""
    for i, stdin in enumerate(job["inputs"]):
        data_fd = os.memfd_create("stdin")
        os.write(data_fd, stdin.encode())
        os.lseek(data_fd, 0, os.SEEK_SET)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the program's process: stdin from the input, stdout into the pipe, no report fd
            os.dup2(data_fd, 0)
            os.dup2(w, 1)
            for fd in (data_fd, r, w, out.fd):
                os.close(fd)
            _start_program(job)
            os._exit(_run_main(job["code"]))
        os.close(w)
        os.close(data_fd)
        captured, over = _read_capped(r, pid, job["max_output"])
        os.close(r)
        code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        out.send({"i": i, "stdout": captured.decode("utf-8", "replace"), "over": over, "exit": code,
                  "memory": code == 3})


def _run_main(code: str) -> int:
    """Run the program as __main__; its exit code: 0, sys.exit's, 1 after an exception, 3 after MemoryError."""
    import builtins

    try:
        exec(compile(code, "solution.py", "exec"), {"__name__": "__main__", "__builtins__": builtins})
        rc = 0
    except SystemExit as e:
        rc = 0 if e.code is None else e.code if type(e.code) is int else 1
    except MemoryError:
        rc = 3
    except BaseException:
        rc = 1
        try:
            import traceback

            traceback.print_exc()
        except BaseException:
            pass
    _flush()
    return rc


def _read_capped(fd: int, pid: int, cap: int) -> tuple[bytes, bool]:
    """Read `fd` to EOF, or until the process `pid` has exited and nothing more is waiting, or past `cap` bytes
    (then the process is killed). A grandchild holding the pipe open cannot keep us reading."""
    import select

    data = bytearray()
    while True:
        ready, _, _ = select.select([fd], [], [], 0.05)
        chunk = os.read(fd, 65536) if ready else b""
        data += chunk
        if len(data) > cap:
            os.kill(pid, 9)
            return bytes(data[:cap]), True
        if ready and not chunk:
            return bytes(data), False
        if not ready and os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
            return bytes(data), False


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:  # the program may have replaced or closed them
            pass


def _start_program(job: dict) -> None:
    """What every process that runs program (or test) code does first: install the audit hook, if it is on."""
    if job["audit_hook"]:
        install_audit_hook(job["workdir"], job["allow_subprocess"])


def main(job_path: str) -> None:
    import _signal  # not `signal`: it imports enum, milliseconds of every start

    with open(job_path, "rb") as f:
        job = loads(f.read())
    # The harness is pid 1 of its namespace, where a signal without a handler is ignored: RLIMIT_CPU's SIGXCPU
    # would only end it at the hard limit's SIGKILL, a second later and indistinguishable from a kill.
    _signal.signal(_signal.SIGXCPU, lambda *_: os._exit(128 + _signal.SIGXCPU))
    set_limits(job["limits"])
    keep = {0, 1, 2, job["report_fd"], job.get("request_fd")}
    for name in os.listdir("/proc/self/fd"):
        if int(name) not in keep:
            try:
                os.close(int(name))
            except OSError:
                pass
    os.chdir(job["workdir"])
    out = _Report(job["report_fd"], job["max_line"])
    layers = ["rlimits"] + (["audit"] if job["audit_hook"] else [])
    out.send({"started": True, "layers": layers})
    if job["mode"] == "judge":
        _start_program(job)
        run_judge(job, out)
    elif job["mode"] == "io":
        run_io(job, out)
    else:
        with open("solution.py", "w") as f:
            f.write(job["code"])
        _start_program(job)
        ns, failed = _load(job["code"], "solution")
        out.send(failed or {"loaded": True})
        if ns is not None:
            (run_calls if job["mode"] == "calls" else run_serve)(job, out, ns)
    _flush()
    out.send({"done": True})
    os._exit(0)  # skip the program's atexit handlers and non-daemon threads


if __name__ == "__main__":
    main(sys.argv[1])
