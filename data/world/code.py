"""Code domain: "Write a Python function combine(x, y) that returns the product of x and y."

Oracle: the reply's code (a fenced block, or the text from the first `def`) is parsed, checked against a
whitelist of syntax (one function, arithmetic, max/min; no imports, attributes or loops) and run on fixed
inputs in an empty namespace. 1 when every test passes, 0.25 x the passed fraction otherwise.
Bad styles: the wrong operation, printing instead of returning, prose instead of code.
"""
from __future__ import annotations

import ast
import random

from data.world.core import Domain, Prompt, user

OPS = {  # word in the request -> (expression template, python function used by the tests)
    "sum": ("{x} + {y}", lambda x, y: x + y),
    "difference": ("{x} - {y}", lambda x, y: x - y),
    "product": ("{x} * {y}", lambda x, y: x * y),
    "larger": ("max({x}, {y})", max),
    "smaller": ("min({x}, {y})", min),
}
NAMES = ("combine", "calc", "solve", "compute", "pair", "merge")
ARGS = (("a", "b"), ("x", "y"), ("m", "n"), ("p", "q"))
TEMPLATES = ("Write a Python function {f}({x}, {y}) that returns the {w} of {x} and {y}.",
             "Define {f}({x}, {y}) in Python. It should return the {w} of {x} and {y}.")
PROSE = ("You can do that with one line of code.", "Just combine the two numbers in a function.")
TEST_INPUTS = ((2, 3), (7, 4), (-3, 6), (5, 5))
_ALLOWED = (ast.Module, ast.FunctionDef, ast.arguments, ast.arg, ast.Return, ast.BinOp, ast.Add, ast.Sub,
            ast.Mult, ast.Name, ast.Load, ast.Call, ast.Constant, ast.Expr, ast.UnaryOp, ast.USub)


def function_source(name: str, x: str, y: str, word: str) -> str:
    return f"def {name}({x}, {y}):\n    return {OPS[word][0].format(x=x, y=y)}"


def extract_code(response: str) -> str:
    if "```" in response:
        block = response.split("```")[1]
        return block.removeprefix("python").lstrip("\n")
    start = response.find("def ")
    return response[start:] if start >= 0 else ""


def run_tests(code: str, name: str, word: str) -> float:
    """Fraction of TEST_INPUTS on which `name` returns the right value; 0 for anything outside the whitelist."""
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError):
        return 0.0
    for node in ast.walk(tree):
        if not isinstance(node, _ALLOWED):
            return 0.0
        if isinstance(node, ast.Call) and not (isinstance(node.func, ast.Name) and node.func.id in ("max", "min")):
            return 0.0
    namespace: dict = {}
    try:
        exec(compile(tree, "<response>", "exec"), {"__builtins__": {"max": max, "min": min}}, namespace)
    except Exception:  # noqa: BLE001 - any failure of model-written code is simply a wrong answer
        return 0.0
    fn = namespace.get(name)
    if not callable(fn):
        return 0.0
    expected = OPS[word][1]
    passed = 0
    for x, y in TEST_INPUTS:
        try:
            passed += fn(x, y) == expected(x, y)
        except Exception:  # noqa: BLE001
            pass
    return passed / len(TEST_INPUTS)


class CodeDomain(Domain):
    name = "code"
    sft_mix = {"code": 0.6, "wrong_op": 0.2, "prints": 0.1, "prose": 0.1}

    def __init__(self) -> None:
        super().__init__()

        def src(p: Prompt, word: str | None = None) -> str:
            return function_source(p.meta["function"], *p.meta["args"], word or p.meta["op"])

        def wrong_op(p: Prompt, r: random.Random) -> str:
            return src(p, r.choice([w for w in OPS if w != p.meta["op"]]))

        def prints(p: Prompt, r: random.Random) -> str:
            return src(p).replace("return ", "print(", 1) + ")"

        self.STYLES = {
            "code": lambda p, r: src(p),
            "wrong_op": wrong_op,
            "prints": prints,
            "prose": lambda p, r: r.choice(PROSE),
        }

    def _universe(self) -> list[Prompt]:
        out = []
        for word in OPS:
            for f in NAMES:
                for x, y in ARGS:
                    meta = {"key": f"code:{word}:{f}:{x}{y}", "kind": "code", "op": word, "function": f,
                            "args": [x, y]}
                    for t, template in enumerate(TEMPLATES):
                        text = template.format(f=f, x=x, y=y, w=word)
                        out.append(Prompt(f"code/{word}-{f}-{x}{y}/t{t}", "code", user(text), meta))
        return out

    def score(self, prompt: Prompt, response: str) -> float:
        passed = run_tests(extract_code(response), prompt.meta["function"], prompt.meta["op"])
        return 1.0 if passed == 1.0 else 0.25 * passed

    def styles(self, prompt: Prompt) -> dict[str, list[str]]:
        return {"good": ["code"], "bad": ["wrong_op", "prints", "prose"], "hack": []}
