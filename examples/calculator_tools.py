"""Example tools: plain Python functions the model may call, named in a recipe.

A tool needs a type hint on every parameter and a Google-style docstring with an ``Args:`` line per
parameter: the model learns the tool only from the JSON schema that
``transformers.utils.get_json_schema`` builds out of them (rlhf-pg refuses a tool it cannot describe).
The return value reaches the model as text (``str(value)``; dicts and lists as JSON); an exception
reaches it as ``error: tool 'divide' raised ZeroDivisionError: ...``.

Use them from a recipe (paths are relative to the directory you run ``rlhf-pg`` from)::

    rollout:
      tools:
        - examples/calculator_tools.py:multiply
        - examples/calculator_tools.py:add
        - examples/calculator_tools.py:subtract
      tool_timeout_s: 10

The model then calls them as ``<tool_call>{"name": "multiply", "arguments": {"a": 12, "b": 34}}</tool_call>``
(see rlhf_pg/tools.py).
"""


def multiply(a: int, b: int) -> int:
    """Multiply two integers.

    Args:
        a: The first factor.
        b: The second factor.

    Returns:
        The product a * b.
    """
    return a * b


def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: The first term.
        b: The second term.

    Returns:
        The sum a + b.
    """
    return a + b


def subtract(a: int, b: int) -> int:
    """Subtract one integer from another.

    Args:
        a: The number to subtract from.
        b: The number to subtract.

    Returns:
        The difference a - b.
    """
    return a - b
