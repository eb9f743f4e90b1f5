"""Math verifier: extract the final answer from a completion and check it against `record["answer"]`.

    scores = math_accuracy(prompts, completions, records)     # 1.0 right, 0.0 wrong / missing / garbage
    extract_answer("so <answer>42</answer>")                  # "42"
    answers_match("\\frac{2}{4}", "0.5")                      # True

Extraction, first rule that applies wins:
  1. the last `<answer>...</answer>` block (the format GRPO-style training asks for; if the block holds a
     `\\boxed{}`, its content);
  2. else the last `\\boxed{...}` (the MATH convention; braces matched, `\\fbox` too);
  3. else a trailing line `Answer: ...` (also `Final answer: ...`, `**Answer:** ...`), on the last non-empty
     line only.
No rule, no answer: score 0 (free text such as "the answer is 5" is not accepted, so the format is learned).

Comparison (`answers_match`), first that decides wins:
  1. equal after normalisation (spaces around symbols, $...$, \\boxed, \\text{}, \\left, \\dfrac, ^\\circ);
  2. both numbers: compared exactly as fractions: 1/2 == 0.5 == 2/4 == \\frac{1}{2}, "1,000" == 1000 (valid
     thousands groups only), 007 == 7, +5 == 5, -0.50 == -1/2, 50% == 50 (a trailing % is dropped);
  3. sympy, when importable and both sides parse: simplify(a - b) == 0 (x^2-1 == (x-1)(x+1), \\sqrt{2}/2 ==
     1/\\sqrt{2}). Untrusted strings never reach sympy's parser (it calls eval) unless they are made of
     numbers, operators, parentheses, single-letter symbols and a few known functions; and sympy runs in a
     separate worker process that is killed after `timeout` seconds (adversarial input such as 9^9^9^9 hangs
     it), under a 2 GiB address-space limit. A timeout counts as "not equal".
"""

from __future__ import annotations

import json
import os
import re
import sys
import threading
from collections.abc import Sequence
from fractions import Fraction

# ------------------------------------------------------------------------------------------------------------
# Extraction
# ------------------------------------------------------------------------------------------------------------

_ANSWER_LINE = re.compile(r"[\s*_#>]*(?:final\s+)?answer\s*[*_]*\s*[:：](.*)", re.IGNORECASE)


def extract_answer(text: str) -> str | None:
    """The final answer in `text` by the precedence in the module docstring, or None."""
    lower = text.lower()  # str.rfind instead of a regex: linear even on "<answer>" repeated 10^5 times
    close = lower.rfind("</answer>")
    open_ = lower.rfind("<answer>", 0, close) if close >= 0 else -1
    if open_ >= 0:
        inner = text[open_ + len("<answer>") : close]
        answer = _last_braced(inner, ("\\boxed", "\\fbox"))
        return _non_empty(inner if answer is None else answer)
    boxed = _last_braced(text, ("\\boxed", "\\fbox"))
    if boxed is not None:
        return _non_empty(boxed)
    lines = [line for line in text.splitlines() if line.strip()]
    if lines:
        m = _ANSWER_LINE.match(lines[-1])  # no lazy group before `\s*$`: that backtracks quadratically
        if m:
            return _non_empty(m.group(1).strip("*_ "))
    return None


def _non_empty(s: str) -> str | None:
    s = s.strip()
    return s or None


def _last_braced(text: str, commands: tuple[str, ...]) -> str | None:
    """Content of the last `\\command{...}` in `text` whose brace is closed, or None."""
    pattern = "(?:" + "|".join(re.escape(c) for c in commands) + r")\s*\{"
    starts = [m.end() for m in re.finditer(pattern, text)]
    if not starts:
        return None
    pairs = _brace_pairs(text)
    for start in reversed(starts):
        if start - 1 in pairs:
            return text[start : pairs[start - 1]]
    return None


def _brace_pairs(text: str) -> dict[int, int]:
    """{index of "{": index of its matching "}"} in one pass (linear even for adversarial nesting)."""
    pairs, stack = {}, []
    for i, c in enumerate(text):
        if c == "{":
            stack.append(i)
        elif c == "}" and stack:
            pairs[stack.pop()] = i
    return pairs


# ------------------------------------------------------------------------------------------------------------
# Normalisation and exact / numeric comparison
# ------------------------------------------------------------------------------------------------------------


def normalize_answer(s: str) -> str:
    """Canonical text of an answer: wrappers and LaTeX spacing removed, whitespace only between words."""
    s = s.strip()
    for _ in range(3):  # nested wrappers: $\boxed{...}$
        s = s.strip()
        for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
            if len(s) >= len(left) + len(right) and s.startswith(left) and s.endswith(right):
                s = s[len(left):-len(right)].strip()
        for command in ("\\boxed", "\\fbox"):
            m = re.match(re.escape(command) + r"\s*\{", s)
            if m and _brace_pairs(s).get(m.end() - 1) == len(s) - 1:
                s = s[m.end() : -1]
    s = re.sub(r"\\(?:text|textbf|textrm|mathrm|mathbf|mbox)\s*\{([^{}]*)\}", r"\1", s)
    s = re.sub(r"\\(?:left|right|displaystyle)(?![a-zA-Z])", "", s)
    s = re.sub(r"\\[,;:! ]", " ", s)
    s = re.sub(r"\^\s*\{?\s*\\circ\s*\}?", "", s)
    s = re.sub(r"\\[dt]frac(?![a-zA-Z])", r"\\frac", s)
    s = s.replace("{,}", ",").replace("\\%", "%")
    s = re.sub(r"\s+", " ", s).strip()
    s = re.sub(r" ?([^\w\\ ]) ?", r"\1", s)  # keep spaces only between words: "5 cm", "\sin x"
    return s.rstrip(".")


# Unambiguous on purpose (no `\d+\.?\d*`, which backtracks quadratically on long digit runs); the exponent is
# capped because Fraction("1e999999999") never returns.
_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)(?:e[+-]?\d{1,3})?"
_OPERAND = rf"({_NUMBER}|\([+-]?{_NUMBER}\))"  # 3 or (-3), as \frac{-3}{4} becomes (-3)/(4)
_FRACTION = re.compile(rf"([+-]?){_OPERAND}(?:/{_OPERAND})?", re.IGNORECASE)
_THOUSANDS = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d*)?")  # 1,234,567.5


def parse_number(s: str) -> Fraction | None:
    """An exact Fraction for a numeric answer (integer, decimal, a/b, \\frac{a}{b}, 1,000, 50%), else None."""
    s = normalize_answer(s).replace(" ", "")
    s = re.sub(r"^([+-]?)\\frac\{([^{}]+)\}\{([^{}]+)\}$", r"\1(\2)/(\3)", s)
    s = re.sub(r"^([+-]?)\\frac(\d)(\d)$", r"\1\2/\3", s)
    if s.endswith("%"):
        s = s[:-1]
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    m = _FRACTION.fullmatch(s)
    if m is None:
        return None
    sign, num, den = m.groups()
    try:  # ValueError: integers of more than 4300 digits (sys.get_int_max_str_digits)
        value, divisor = Fraction(num.strip("()")), Fraction((den or "1").strip("()"))
    except ValueError:
        return None
    if divisor == 0:
        return None
    return -value / divisor if sign == "-" else value / divisor


def answers_match(pred: str | None, gold: str, use_sympy: bool = True, timeout: float = 3.0) -> bool:
    """Is `pred` the same answer as `gold`? Exact text, then exact numbers, then sympy (module docstring)."""
    if pred is None:
        return False
    p, g = normalize_answer(pred), normalize_answer(str(gold))
    if not p:
        return False
    if p == g:
        return True
    pn, gn = parse_number(p), parse_number(g)
    if pn is not None and gn is not None:
        return pn == gn
    if use_sympy:
        return sympy_equivalent(p, g, timeout) is True
    return False


def math_accuracy(
    prompts: Sequence[str], completions: Sequence[str], records: Sequence[dict], use_sympy: bool = True
) -> list[float]:
    """1.0 where the completion's answer matches `record["answer"]`, else 0.0 (never raises on any text)."""
    scores = []
    for i, (completion, record) in enumerate(zip(completions, records)):
        if "answer" not in record:
            raise ValueError(f"record {i} has no 'answer' field (math rewards need {{'prompt', 'answer'}})")
        pred = extract_answer(completion) if isinstance(completion, str) else None
        scores.append(float(answers_match(pred, str(record["answer"]), use_sympy)))
    return scores


# ------------------------------------------------------------------------------------------------------------
# Sympy equivalence, in a worker process
# ------------------------------------------------------------------------------------------------------------

_FUNCTIONS = ("sqrt", "sin", "cos", "tan", "log", "ln", "exp")
_CONSTANTS = ("pi",)
_INNERMOST = re.compile(  # \frac{a}{b}, \sqrt[n]{a}, \sqrt{a} with no braces inside
    r"\\frac\{([^{}]*)\}\{([^{}]*)\}|\\sqrt\[([^\[\]{}]*)\]\{([^{}]*)\}|\\sqrt\{([^{}]*)\}"
)
_TOKEN = re.compile(r"\s*(?:(\d+(?:\.\d*)?|\.\d+)|([a-zA-Z]+)|([-+*/^()!]))")


def to_sympy_syntax(s: str) -> str | None:
    """Plain-text math for sympy from a normalised answer, or None unless it is built only from numbers,
    + - * / ^ ( ) !, single-letter symbols and the names in _FUNCTIONS and _CONSTANTS (nothing to abuse)."""
    if len(s) > 200:
        return None
    s = _latex_to_plain(s)
    s = s.strip() if s is not None else ""
    if not s:
        return None
    pos = 0
    while pos < len(s):
        m = _TOKEN.match(s, pos)
        if m is None or m.end() == pos:
            return None
        word = m.group(2)
        if word and len(word) > 1 and word not in _FUNCTIONS + _CONSTANTS:
            return None
        pos = m.end()
    return s


def _latex_to_plain(s: str) -> str | None:
    """\\frac{a}{b} -> ((a)/(b)), \\sqrt[n]{a} -> ((a)^(1/(n))), \\sqrt{a} -> sqrt(a), \\cdot -> *, {} -> ();
    None when a LaTeX command is left that we do not translate."""
    for _ in range(50):  # innermost first, so nested fractions unfold; bounded for pathological input
        m = _INNERMOST.search(s)
        if m is None:
            break
        if m.group(1) is not None:
            new = f"(({m.group(1)})/({m.group(2)}))"
        elif m.group(3) is not None:
            new = f"(({m.group(4)})^(1/({m.group(3)})))"
        else:
            new = f"sqrt({m.group(5)})"
        s = s[: m.start()] + new + s[m.end():]
    s = re.sub(r"\\frac(\d)(\d)", r"((\1)/(\2))", s)
    s = re.sub(r"\\sqrt(\d+)", r"sqrt(\1)", s)
    s = re.sub(r"\\(?:cdot|times)(?![a-zA-Z])", "*", s)
    s = re.sub(r"\\div(?![a-zA-Z])", "/", s)
    s = re.sub(r"\\(pi|sin|cos|tan|log|ln|exp)(?![a-zA-Z])", r" \1 ", s)
    s = s.replace("{", "(").replace("}", ")")
    return None if "\\" in s else s


def _sympy_equal(a: str, b: str) -> bool:
    """simplify(a - b) == 0, parsing with builtins removed and only whitelisted names (runs in the worker)."""
    import sympy
    from sympy.parsing.sympy_parser import (
        convert_xor,
        implicit_multiplication_application,
        parse_expr,
        standard_transformations,
    )

    # only what the parser's transformations emit; no builtins, so eval has nothing to reach for
    global_dict = {"__builtins__": {}}
    for name in ("Integer", "Float", "Rational", "Symbol", "Function", "factorial"):
        global_dict[name] = getattr(sympy, name)
    local_dict = {"sqrt": sympy.sqrt, "sin": sympy.sin, "cos": sympy.cos, "tan": sympy.tan, "log": sympy.log,
                  "ln": sympy.log, "exp": sympy.exp, "pi": sympy.pi, "e": sympy.E, "i": sympy.I}
    transformations = standard_transformations + (implicit_multiplication_application, convert_xor)
    ea, eb = (parse_expr(x, local_dict=local_dict, global_dict=global_dict, transformations=transformations)
              for x in (a, b))
    diff = sympy.simplify(ea - eb)
    if diff == 0:
        return True
    if not diff.free_symbols:  # constants simplify() left alone, e.g. nested radicals
        return bool(abs(complex(diff.evalf(30))) < 1e-12)
    return False


_WORKER_NAME = "__tether_sympy_worker__"
_BOOT = (
    f"import sys, types; p = sys.argv[1]; name = {_WORKER_NAME!r}; "
    "m = sys.modules[name] = types.ModuleType(name); m.__file__ = p; "
    "exec(compile(open(p).read(), p, 'exec'), m.__dict__)"
)


class SympyWorker:
    """One long-lived sympy process answering `[a, b]` JSON lines with true / false / null; killed and
    restarted when a question takes longer than its timeout. Thread-safe (one question at a time)."""

    def __init__(self, start_timeout: float = 60.0):
        import atexit

        self.start_timeout = start_timeout
        self.proc = None
        self.buffer = b""
        self.lock = threading.Lock()
        atexit.register(self.close)

    def equal(self, a: str, b: str, timeout: float) -> bool | None:
        with self.lock:
            try:
                if self.proc is None or self.proc.poll() is not None:
                    self._start()
                os.write(self.proc.stdin.fileno(), (json.dumps([a, b]) + "\n").encode())
                line = self._readline(timeout)
            except OSError:
                line = None
            if line is None:
                self.close()
                return None
            try:
                return json.loads(line)
            except ValueError:
                return None

    def _start(self) -> None:
        import subprocess

        self.close()
        # -c and cwd "/": this directory must not be on sys.path (this file would shadow the stdlib `math`).
        self.proc = subprocess.Popen(
            [sys.executable, "-I", "-B", "-c", _BOOT, os.path.abspath(__file__)], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd="/", start_new_session=True,
        )
        if self._readline(self.start_timeout) != b"ready":
            self.close()
            raise OSError("sympy worker did not start")

    def _readline(self, timeout: float) -> bytes | None:
        import select
        import time

        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 4096)
            if not chunk:
                return None
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line.strip()

    def close(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            for f in (self.proc.stdin, self.proc.stdout):
                f.close()
        self.proc, self.buffer = None, b""


_WORKER = SympyWorker()


def sympy_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("sympy") is not None


def sympy_equivalent(a: str, b: str, timeout: float = 3.0) -> bool | None:
    """Are normalised answers `a` and `b` symbolically equal? None when sympy is missing, either side is not
    in the safe syntax or does not parse, or the check ran out of time."""
    sa, sb = to_sympy_syntax(a), to_sympy_syntax(b)
    if sa is None or sb is None or not sympy_available():
        return None
    return _WORKER.equal(sa, sb, timeout)


def _worker_main() -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
    parent = os.getppid()

    def watch_parent():  # exit if the parent died without closing our stdin (e.g. while we were computing)
        import time

        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch_parent, daemon=True).start()
    import sympy  # noqa: F401  (import once, before saying ready)

    out = sys.stdout
    out.write("ready\n")
    out.flush()
    for line in sys.stdin:
        try:
            a, b = json.loads(line)
            answer = _sympy_equal(a, b)
        except BaseException:  # parse errors, MemoryError, RecursionError: "unknown"
            answer = None
        out.write(json.dumps(answer) + "\n")
        out.flush()


if __name__ == _WORKER_NAME:
    _worker_main()
