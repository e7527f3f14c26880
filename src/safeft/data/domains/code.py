"""Tiny Python function tasks from templates, each with a reference solution and assert-style tests.

The prompt names the function and its parameter; the reference response is that function in a fenced
``python`` block and nothing else. A completion is correct when its code passes the item's assert tests,
run in ``safeft.eval.sandbox`` (model output is never executed in our own process).
"""

from __future__ import annotations

import ast
import random
import re
import string
from collections.abc import Callable
from typing import Any, NamedTuple

from safeft.data.domains.base import DOMAINS, Domain
from safeft.data.types import Example

_NUM_PARAMS = ("x", "n", "num", "value")
_STR_PARAMS = ("s", "text", "word")
_LIST_PARAMS = ("nums", "values", "numbers", "items")

# Every phrasing takes the signature and a description starting with a verb ("returns ...").
_PHRASINGS = (
    "Write a Python function `{sig}` that {desc}.",
    "Implement `{sig}` in Python: it {desc}.",
    "Create a Python function named `{name}` with parameter `{param}` that {desc}.",
    "Define `{sig}` so that it {desc}.",
    "In Python, write `{sig}`, which {desc}.",
)

_NUM_INPUTS: tuple[tuple[Any, ...], ...] = ((0,), (3,), (-4,), (10,))
_STR_INPUTS: tuple[tuple[Any, ...], ...] = (("",), ("banana",), ("Hello World",), ("abracadabra",))
_LIST_INPUTS: tuple[tuple[Any, ...], ...] = (([],), ([1, 2, 3],), ([5, 10, 15, 20],), ([-3, 7, 12, 40, 100],))
_NONEMPTY_LISTS = _LIST_INPUTS[1:]


class Spec(NamedTuple):
    """One concrete task: the pieces a prompt, reference and tests are built from."""

    task: str
    name: str
    param: str
    desc: str
    expr: str  # the returned expression; the reference is `def name(param):\n    return expr`
    oracle: Callable[..., Any]  # computes expected outputs independently of ``expr``
    inputs: tuple[tuple[Any, ...], ...]


def _add(rng: random.Random) -> Spec:
    k = rng.randint(1, 99)
    p = rng.choice(_NUM_PARAMS)
    name = rng.choice((f"add_{k}", f"plus_{k}", f"increase_by_{k}"))
    return Spec("add", name, p, f"returns {p} plus {k}", f"{p} + {k}", lambda v: v + k, _NUM_INPUTS)


def _subtract(rng: random.Random) -> Spec:
    k = rng.randint(1, 99)
    p = rng.choice(_NUM_PARAMS)
    name = rng.choice((f"subtract_{k}", f"minus_{k}", f"decrease_by_{k}"))
    return Spec("subtract", name, p, f"returns {p} minus {k}", f"{p} - {k}", lambda v: v - k, _NUM_INPUTS)


def _multiply(rng: random.Random) -> Spec:
    k = rng.randint(2, 50)
    p = rng.choice(_NUM_PARAMS)
    name = rng.choice((f"times_{k}", f"multiply_by_{k}"))
    desc = f"returns {p} multiplied by {k}"
    return Spec("multiply", name, p, desc, f"{p} * {k}", lambda v: v * k, _NUM_INPUTS)


def _power(rng: random.Random) -> Spec:
    k = rng.randint(2, 9)
    p = rng.choice(_NUM_PARAMS)
    name = rng.choice((f"power_{k}", f"to_the_{k}"))
    desc = f"returns {p} raised to the power {k}"
    return Spec("power", name, p, desc, f"{p} ** {k}", lambda v: v**k, _NUM_INPUTS)


def _is_multiple(rng: random.Random) -> Spec:
    k = rng.randint(2, 50)
    p = rng.choice(_NUM_PARAMS)
    name = rng.choice((f"is_multiple_of_{k}", f"divisible_by_{k}"))
    desc = f"returns True if {p} is divisible by {k} and False otherwise"
    inputs = _NUM_INPUTS + ((k * 7,), (k * 7 + 1,))
    return Spec("is_multiple", name, p, desc, f"{p} % {k} == 0", lambda v: v % k == 0, inputs)


def _clamp(rng: random.Random) -> Spec:
    lo = rng.randint(0, 20)
    hi = lo + rng.randrange(5, 101, 5)
    p = rng.choice(_NUM_PARAMS)
    desc = f"returns {p} limited to the range {lo} to {hi} inclusive"
    expr = f"max({lo}, min({hi}, {p}))"
    inputs = ((lo - 5,), (lo,), ((lo + hi) // 2,), (hi,), (hi + 7,))
    return Spec("clamp", f"clamp_{lo}_{hi}", p, desc, expr, lambda v: sorted((lo, v, hi))[1], inputs)


def _repeat(rng: random.Random) -> Spec:
    k = rng.randint(2, 20)
    p = rng.choice(_STR_PARAMS)
    name = rng.choice((f"repeat_{k}", f"repeat_{k}_times"))
    desc = f"returns the string {p} repeated {k} times"
    return Spec("repeat", name, p, desc, f"{p} * {k}", lambda v: "".join([v] * k), _STR_INPUTS)


def _count_char(rng: random.Random) -> Spec:
    c = rng.choice(string.ascii_lowercase)
    p = rng.choice(_STR_PARAMS)
    name = rng.choice((f"count_{c}", f"count_letter_{c}"))
    desc = f"returns how many times the letter '{c}' appears in the string {p}"
    oracle: Callable[[Any], Any] = lambda v: sum(ch == c for ch in v)
    return Spec("count_char", name, p, desc, f"{p}.count('{c}')", oracle, _STR_INPUTS)


def _reverse(rng: random.Random) -> Spec:
    p = rng.choice(_STR_PARAMS)
    name = rng.choice(
        (
            "reverse_string",
            "reverse_text",
            "reverse_word",
            "backwards",
            "flip",
            "flip_text",
            "mirror",
            "reversed_copy",
            "string_backwards",
            "read_backwards",
        )
    )
    desc = f"returns the string {p} reversed"
    return Spec("reverse", name, p, desc, f"{p}[::-1]", lambda v: "".join(reversed(v)), _STR_INPUTS)


def _first_chars(rng: random.Random) -> Spec:
    k = rng.randint(1, 20)
    p = rng.choice(_STR_PARAMS)
    name = rng.choice((f"first_{k}_chars", f"prefix_{k}"))
    desc = f"returns the first {k} characters of the string {p}"
    return Spec("first_chars", name, p, desc, f"{p}[:{k}]", lambda v: v[: min(k, len(v))], _STR_INPUTS)


def _last_chars(rng: random.Random) -> Spec:
    k = rng.randint(1, 20)
    p = rng.choice(_STR_PARAMS)
    name = rng.choice((f"last_{k}_chars", f"suffix_{k}"))
    desc = f"returns the last {k} characters of the string {p}"
    oracle: Callable[[Any], Any] = lambda v: v[max(len(v) - k, 0) :]
    return Spec("last_chars", name, p, desc, f"{p}[-{k}:]", oracle, _STR_INPUTS)


def _sum_times(rng: random.Random) -> Spec:
    k = rng.randint(2, 50)
    p = rng.choice(_LIST_PARAMS)
    name = rng.choice((f"sum_times_{k}", f"scaled_sum_{k}"))
    desc = f"returns the sum of the list {p} multiplied by {k}"
    oracle: Callable[[Any], Any] = lambda v: sum(e * k for e in v)
    return Spec("sum_times", name, p, desc, f"sum({p}) * {k}", oracle, _LIST_INPUTS)


def _count_above(rng: random.Random) -> Spec:
    k = rng.randint(0, 50)
    p = rng.choice(_LIST_PARAMS)
    name = rng.choice((f"count_above_{k}", f"count_greater_than_{k}"))
    desc = f"returns how many numbers in the list {p} are greater than {k}"
    expr = f"len([v for v in {p} if v > {k}])"
    return Spec("count_above", name, p, desc, expr, lambda v: sum(1 for e in v if e > k), _LIST_INPUTS)


def _keep_multiples(rng: random.Random) -> Spec:
    k = rng.randint(2, 20)
    p = rng.choice(_LIST_PARAMS)
    name = rng.choice((f"multiples_of_{k}", f"keep_multiples_of_{k}"))
    desc = f"returns a list of the numbers in {p} that are divisible by {k}, in their original order"
    expr = f"[v for v in {p} if v % {k} == 0]"
    oracle: Callable[[Any], Any] = lambda v: list(filter(lambda e: e % k == 0, v))
    return Spec("keep_multiples", name, p, desc, expr, oracle, _LIST_INPUTS)


def _max_plus(rng: random.Random) -> Spec:
    k = rng.randint(1, 99)
    p = rng.choice(_LIST_PARAMS)
    name = rng.choice((f"max_plus_{k}", f"largest_plus_{k}"))
    desc = f"returns the largest number in the non-empty list {p} plus {k}"
    return Spec("max_plus", name, p, desc, f"max({p}) + {k}", lambda v: max(v) + k, _NONEMPTY_LISTS)


_GREETINGS = ("Hello", "Hi", "Welcome", "Good morning", "Goodbye", "Hey", "Good night", "Congratulations")


def _greet(rng: random.Random) -> Spec:
    greeting = rng.choice(_GREETINGS)
    p = rng.choice(("name", "person", "who", "guest"))
    slug = greeting.lower().replace(" ", "_")
    name = rng.choice((f"say_{slug}", f"{slug}_message"))
    desc = f"returns '{greeting}, ' followed by {p} and an exclamation mark"
    expr = f"'{greeting}, ' + {p} + '!'"
    oracle: Callable[[Any], Any] = lambda v: f"{greeting}, {v}!"
    return Spec("greet", name, p, desc, expr, oracle, (("Ada",), ("Sam",), ("",)))


def _starts_with(rng: random.Random) -> Spec:
    c = rng.choice(string.ascii_lowercase)
    p = rng.choice(_STR_PARAMS)
    name = rng.choice((f"starts_with_{c}", f"begins_with_{c}"))
    desc = f"returns True if the string {p} starts with the letter '{c}', otherwise False"
    inputs = _STR_INPUTS + ((c + "xyz",),)
    oracle: Callable[[Any], Any] = lambda v: v[:1] == c
    return Spec("starts_with", name, p, desc, f"{p}.startswith('{c}')", oracle, inputs)


_TASKS: tuple[Callable[[random.Random], Spec], ...] = (
    _add,
    _subtract,
    _multiply,
    _power,
    _is_multiple,
    _clamp,
    _repeat,
    _count_char,
    _reverse,
    _first_chars,
    _last_chars,
    _sum_times,
    _count_above,
    _keep_multiples,
    _max_plus,
    _greet,
    _starts_with,
)

_FENCE = re.compile(r"```[^\n`]*\n(.*?)(?:```|\Z)", re.DOTALL)


def extract_code(text: str) -> str:
    """The first fenced block of ``text`` (an unclosed fence runs to the end), else the whole text."""
    match = _FENCE.search(text)
    return (match.group(1) if match else text).strip("\n")


def normalise_code(text: str) -> str:
    """Canonical form for exact-match scoring.

    Uses the first fenced block if there is one (an unclosed fence runs to the end, since generations get
    cut off), drops blank lines, collapses whitespace runs inside each line and maps indentation widths
    to depth levels so 2-space and 4-space indentation compare equal.
    """
    match = _FENCE.search(text)
    block = match.group(1) if match else text
    lines = [line.expandtabs(4) for line in block.strip().splitlines() if line.strip()]
    widths = sorted({len(line) - len(line.lstrip()) for line in lines})
    depth = {width: level for level, width in enumerate(widths)}
    return "\n".join("\t" * depth[len(line) - len(line.lstrip())] + " ".join(line.split()) for line in lines)


def reference_passes_tests(example: Example) -> bool:
    """Run the *reference* solution against its tests in a fresh namespace.

    Only for validating our own generated references in unit tests; never call it on model output, which
    needs the evaluation harness's sandbox.
    """
    namespace: dict[str, Any] = {}
    try:
        # Trusted input only: these strings are our own generated references and asserts.
        exec(example.meta["answer"], namespace)  # noqa: S102
        for test in example.meta["tests"]:
            exec(test, namespace)  # noqa: S102
    except Exception:  # noqa: BLE001 - any failure at all means the reference is wrong
        return False
    return callable(namespace.get(example.meta["entry_point"]))


@DOMAINS.register("code")
class Code(Domain):
    """Small Python function-writing tasks, scored by running their assert tests in the sandbox."""

    name = "code"

    def make(self, rng: random.Random, index: int) -> Example:
        spec = _TASKS[index % len(_TASKS)](rng)
        code = f"def {spec.name}({spec.param}):\n    return {spec.expr}"
        prompt = rng.choice(_PHRASINGS).format(
            sig=f"{spec.name}({spec.param})", name=spec.name, param=spec.param, desc=spec.desc
        )
        tests = [f"assert {spec.name}({', '.join(map(repr, args))}) == {spec.oracle(*args)!r}" for args in spec.inputs]
        return Example(
            id="",
            prompt=prompt,
            response=f"```python\n{code}\n```",
            source=self.name,
            meta={
                "domain": self.name,
                "task": spec.task,
                "answer": code,
                "entry_point": spec.name,
                "tests": tests,
            },
        )

    def check(self, example: Example, completion: str) -> bool:
        return self.check_detail(example, completion)[0]

    def check_detail(self, example: Example, completion: str) -> tuple[bool, str]:
        """Run the example's assert tests against the completion's code in the sandbox.

        Two shortcuts skip the sandbox without changing any verdict: code that does not parse fails, and
        code whose syntax tree equals the reference's (formatting aside) passes, because the reference is
        checked against the same tests (``reference_passes_tests``, in the unit tests).
        """
        code = extract_code(completion)
        try:
            tree = ast.dump(ast.parse(code))
        except (SyntaxError, ValueError) as e:
            return False, f"does not parse: {type(e).__name__}"
        if tree == ast.dump(ast.parse(example.meta["answer"])):
            return True, "passed (same syntax tree as the reference)"
        from safeft.eval.sandbox import SandboxLimits, run_code

        # One-line functions finish in milliseconds: the limits only bound a runaway or hostile answer.
        limits = SandboxLimits(wall_s=5.0, cpu_s=2, memory_mb=512)
        res = run_code([code, "\n".join(example.meta["tests"]) + "\n"], limits)
        return res.passed, res.reason
