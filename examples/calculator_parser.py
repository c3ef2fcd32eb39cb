"""A tool-call parser for small models: an arithmetic expression ending in "=" is a calculator call.

SmolLM2-135M-Instruct never writes the tagged JSON call of the default format, but it readily writes
"315 * 364 =" — so let that be the call, as in a calculator (or Toolformer's inline calls). With
``rollout.stop: ["="]`` the model's turn ends at the "=", this parser turns the expression into a call
of the ``multiply`` (``add``, ``subtract``) tool of examples/calculator_tools.py, the result comes back
as the tool's message, and the model replies. A turn without such an expression has no call: the
episode ends (that turn is the answer)::

    rollout:
      tools: [examples/calculator_tools.py:multiply]
      tool_parser: examples/calculator_parser.py:parse_expression
      stop: ["="]
"""

from __future__ import annotations

import re

from rlhf_pg.tools import ToolCall

_OPS = {"*": "multiply", "×": "multiply", "x": "multiply", "+": "add", "-": "subtract"}
_CALL = re.compile(r"(-?\d[\d,]*)\s*([*×x+\-])\s*(-?\d[\d,]*)\s*=\s*$")


def parse_expression(text: str) -> list[ToolCall]:
    """``"... 315 * 364 ="`` → ``[ToolCall("multiply", {"a": 315, "b": 364})]``; no call otherwise."""
    m = _CALL.search(text)
    if m is None:
        return []
    a, op, b = m.groups()
    return [ToolCall(_OPS[op], {"a": int(a.replace(",", "")), "b": int(b.replace(",", ""))})]
