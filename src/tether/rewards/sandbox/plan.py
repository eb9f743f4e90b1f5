"""Tests into a plan the program cannot forge: what runs inside the sandbox, and what stays in the parent.

    plan = make_plan(["assert add(1, 2) == 3"])
    plan.mode, plan.units, plan.checks     # "calls", (("call", "add(1, 2)"),), (("==", 3),)
    judge(plan, [3])                       # [True]: the parent compares, the program never saw the 3

Three modes, chosen per record:
  calls  every test is `assert P OP L`, `assert L OP P`, `assert P` or `assert not P`, where L is a literal
         (ast.literal_eval) and P a "program expression": its spine (call, attribute, subscript) starts at a name
         the tests do not define, so its value is the program's own answer. The sandbox evaluates P and sends
         the value back as data; OP and L never leave the parent.
  judge  anything else (HumanEval's `check(candidate)`, `assert len(f(x)) == 3`, `math.isclose(...)`): the
         tests run in a second, clean sandbox holding no program code, where each name the tests call but do
         not define is a proxy that relays the call to the program's sandbox and returns its result as data.
         A P wrapped in a builtin is judged here because inside the program's process the builtin is the
         program's to replace (`abs` patched to return 0 would pass `assert abs(f(x) - 1.5) < 1e-6`).
  io     tests given as [{"input": ..., "output": ...}]: the program runs once per input, the parent compares
         what it printed (trailing whitespace ignored per line, trailing blank lines ignored).
"""

from __future__ import annotations

import ast
import builtins
import operator
import sys
from collections.abc import Sequence
from dataclasses import dataclass

# op name -> how the parent applies it to (value, expected)
OPS = {
    "==": operator.eq, "!=": operator.ne, "<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge,
    "in": lambda v, e: v in e, "not in": lambda v, e: v not in e, "contains": lambda v, e: e in v,
    "not contains": lambda v, e: e not in v, "is": operator.is_, "is not": operator.is_not,
    "truthy": lambda v, e: bool(v), "falsy": lambda v, e: not v,
}
_AST_OPS = {ast.Eq: "==", ast.NotEq: "!=", ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=",
            ast.In: "in", ast.NotIn: "not in", ast.Is: "is", ast.IsNot: "is not"}
# `L OP P` read as `P OP' L`
_MIRRORED = {"==": "==", "!=": "!=", "<": ">", "<=": ">=", ">": "<", ">=": "<=", "in": "contains",
             "not in": "not contains"}
_NO_LITERAL = object()


@dataclass(frozen=True)
class Plan:
    mode: str  # "calls", "judge" or "io"
    units: tuple  # calls: ("setup" | "call", source); judge: ("setup" | "test", source); io: stdin strings
    checks: tuple = ()  # calls: (op, expected) per call unit; io: expected stdout per input. Parent only.
    proxies: tuple[str, ...] = ()  # judge: the program's names the tests call
    modules: tuple[str, ...] = ()  # judge: stdlib modules the tests use without importing them

    @property
    def n_total(self) -> int:
        return len(self.checks) if self.mode != "judge" else sum(kind == "test" for kind, _ in self.units)


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


def make_plan(tests) -> Plan:
    """The plan for `record["tests"]`: io for a list of {"input", "output"} dicts, else calls or judge.
    Raises ValueError for tests that cannot be run (bad data must not score as a failing program)."""
    if isinstance(tests, Sequence) and tests and all(isinstance(t, dict) for t in tests):
        return _io_plan(tests)
    try:
        return _code_plan(tests)
    except (RecursionError, MemoryError):  # the parser's own stack, on deeply nested expressions
        raise ValueError("tests nested too deeply to parse") from None


def _code_plan(tests) -> Plan:
    units = split_tests(tests)
    trees = [ast.parse(source) for _, source in units]
    defined = set().union(*(_bound_names(t) for t in trees))
    checks = [_as_check(t, defined) for (kind, _), t in zip(units, trees) if kind == "test"]
    if all(c is not None for c in checks):
        calls = iter(checks)
        plan_units = tuple(("setup", s) if kind == "setup" else ("call", next(calls)[0]) for kind, s in units)
        return Plan("calls", plan_units, tuple((op, expected) for _, op, expected in checks))
    free = sorted(set().union(*(_loaded_names(t) for t in trees)) - defined - set(dir(builtins)))
    modules = tuple(n for n in free if n in sys.stdlib_module_names)
    return Plan("judge", tuple(units), proxies=tuple(n for n in free if n not in modules), modules=modules)


def _io_plan(tests: Sequence[dict]) -> Plan:
    inputs, outputs = [], []
    for i, t in enumerate(tests):
        stdin, stdout = t.get("input", t.get("stdin")), t.get("output", t.get("stdout"))
        if not isinstance(stdin, str) or not isinstance(stdout, str):
            raise ValueError(f"test {i}: an io test needs string 'input' and 'output'")
        inputs.append(stdin)
        outputs.append(stdout)
    return Plan("io", tuple(inputs), tuple(outputs))


def _as_check(tree: ast.Module, defined: set[str]) -> tuple[str, str, object] | None:
    """(program expression source, op, expected literal) for a test the parent can judge alone, else None."""
    if len(tree.body) != 1 or not isinstance(tree.body[0], ast.Assert):
        return None
    test = tree.body[0].test
    if isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not):
        return (ast.unparse(test.operand), "falsy", None) if _is_program(test.operand, defined) else None
    if not isinstance(test, ast.Compare):
        return (ast.unparse(test), "truthy", None) if _is_program(test, defined) else None
    if len(test.ops) != 1 or type(test.ops[0]) not in _AST_OPS:
        return None
    op, left, right = _AST_OPS[type(test.ops[0])], test.left, test.comparators[0]
    if _is_program(left, defined) and (expected := _literal(right)) is not _NO_LITERAL:
        if op in ("is", "is not") and expected not in (None, True, False):
            return None  # identity of anything else depends on the interpreter, not the program
        return ast.unparse(left), op, expected
    if op in _MIRRORED and _is_program(right, defined) and (expected := _literal(left)) is not _NO_LITERAL:
        return ast.unparse(right), _MIRRORED[op], expected
    return None


def _is_program(node: ast.expr, defined: set[str]) -> bool:
    """True when the value of `node` is the program's own: its spine ends at a name the tests do not define."""
    while isinstance(node, (ast.Call, ast.Attribute, ast.Subscript)):
        node = node.func if isinstance(node, ast.Call) else node.value
    return isinstance(node, ast.Name) and node.id not in defined and not hasattr(builtins, node.id)


def _literal(node: ast.expr):
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return _NO_LITERAL


def _bound_names(tree: ast.AST) -> set[str]:
    """Every name the tests bind anywhere (assignments, defs, imports, arguments, loop and with targets)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            names.add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            names.add(node.name)
    return names


def _loaded_names(tree: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}


def judge(plan: Plan, values: Sequence) -> list[bool]:
    """Verdict per test from what came back (decoded plain data, or None where nothing usable came back).

    calls: OPS[op](value, expected) on builtins only, any exception a failure; io: stdout == expected, both
    normalised by `_normalise_output`. `values[i]` must be a (value,) 1-tuple for calls, a str for io.
    """
    verdicts = []
    for got, check in zip(values, plan.checks):
        try:
            if plan.mode == "io":
                ok = isinstance(got, str) and _normalise_output(got) == _normalise_output(check)
            else:
                ok = got is not None and bool(OPS[check[0]](got[0], check[1]))
        except Exception:  # e.g. 1 < "a", or a comparison too deep for the stack
            ok = False
        verdicts.append(ok)
    return verdicts + [False] * (len(plan.checks) - len(verdicts))


def _normalise_output(text: str) -> str:
    return "\n".join(line.rstrip() for line in text.rstrip().splitlines())
