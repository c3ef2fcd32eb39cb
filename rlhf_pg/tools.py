"""Tools: the common special case of an environment, where the environment runs the model's function calls.

A recipe lists plain Python functions (``rollout.tools: [path/to/tools.py:multiply, ...]``), each with
type hints and a Google-style docstring (an ``Args:`` line per parameter): that is what
:func:`transformers.utils.get_json_schema` needs to describe the function to the model, and a function
it cannot describe is refused at start. :class:`ToolEnv` then plays the environment: ``reset`` puts
the tools' schemas and the call format in the system message, and ``step`` runs the calls the model
wrote and answers with their results, until a turn has no call (the model answered: the episode ends).

The default call format (Hermes / Qwen, so models trained on it need no teaching)::

    <tool_call>{"name": "multiply", "arguments": {"a": 12, "b": 34}}</tool_call>

Every tagged block in the turn is one call, in order; the recipe uses :data:`STOP` (the closing tag)
as a stop string, so a turn ends at its call. Each result comes back as one message
``{"role": "tool", "content": "<tool_response>408</tool_response>"}`` per call. A different format
is a user parser, ``rollout.tool_parser: path.py:function`` (``fn(text) -> list`` of :class:`ToolCall`
or ``{"name": ..., "arguments": {...}}`` dicts, ``[]`` when the text has no call).

Error policy: the model's mistakes never crash the run; the model sees them. A malformed call
(invalid JSON, no ``name``, non-object ``arguments``, an unclosed tag — the turn was cut), an unknown
tool, arguments that do not fit the signature, an exception in the tool, a timeout, or more calls
than ``max_calls_per_turn`` each become a one-line ``error: ...`` result in that call's
``<tool_response>``, and count in ``info["tool_errors"]`` (logged as ``episode/tool_errors``). The
user's mistakes (a tool that cannot be described, duplicate names, a parser returning the wrong
type) are :class:`~rlhf_pg.errors.UserError` s, at start where possible.

Timeouts (``rollout.tool_timeout_s``, default 10 s). An ``async def`` tool runs under
:func:`asyncio.wait_for` (in a fresh event loop per call) and is truly cancelled on timeout. A
synchronous tool runs in a daemon thread that is waited on for ``timeout_s``; Python cannot kill a
thread, so a hung synchronous call is *abandoned*: the model gets the timeout error and the episode
goes on, while the call keeps running in the background until it returns (or the process exits),
holding whatever it holds. Tools that may hang (network, subprocesses) should be ``async def`` or
enforce their own timeouts.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import user_code
from .data import is_message
from .envs import Environment, EnvStep, Messages, preview
from .errors import UserError, one_line

CALL_OPEN = "<tool_call>"
CALL_CLOSE = "</tool_call>"
STOP = CALL_CLOSE
"""The stop string of a tool recipe: the model's turn ends when it has closed a call."""
RESPONSE_OPEN = "<tool_response>"
RESPONSE_CLOSE = "</tool_response>"
FORMAT_HINT = f'write {CALL_OPEN}{{"name": "<tool name>", "arguments": {{...}}}}{CALL_CLOSE}'
"""Appended to the parser's error messages, so the model sees the format it should have used."""


# ------------------------------------------------------------------------------------------ tools
@dataclass
class Tool:
    """A function the model may call, with the JSON schema that describes it to the model."""

    name: str
    """The name the model calls it by (the function's ``__name__``)."""
    fn: Callable[..., Any]
    schema: dict[str, Any]
    """``transformers.utils.get_json_schema(fn)``: ``{"type": "function", "function": {"name", "description",
    "parameters"}}``, the form chat templates take as ``tools=``."""
    is_async: bool = False
    """``fn`` is ``async def``: it runs in an event loop and can be cancelled on timeout."""


def make_tool(fn: Callable[..., Any], ref: str | None = None) -> Tool:
    """Describe ``fn`` as a :class:`Tool`; ``ref`` (e.g. ``'tools.py:multiply'``) names it in errors.

    The schema is what the model learns the tool from, so a function without type hints or without a
    docstring entry per parameter is refused here, at start, rather than shown half-described."""
    from transformers.utils import get_json_schema

    what = f"tool {ref or getattr(fn, '__name__', repr(fn))!r}"
    if not callable(fn):
        raise UserError(f"{what} is a {type(fn).__name__}, not callable — point it at a function")
    try:
        schema = get_json_schema(fn)
    except Exception as exc:  # DocstringParsingException, TypeHintParsingException, unresolvable hints
        raise UserError(
            f"{what} cannot be described to the model: {one_line(exc)} — give every parameter a type hint and "
            "the function a Google-style docstring with an 'Args:' line per parameter"
        ) from exc
    is_async = inspect.iscoroutinefunction(fn) or (
        not inspect.isroutine(fn) and inspect.iscoroutinefunction(type(fn).__call__)  # an object with async __call__
    )
    return Tool(name=schema["function"]["name"], fn=fn, schema=schema, is_async=is_async)


def load_tools(refs: list[str]) -> list[Tool]:
    """``rollout.tools`` → the tools, loaded and described now: each ``package.module:function`` or
    ``path/to/file.py:function``; names must be unique (the model calls tools by name)."""
    if isinstance(refs, str) or not isinstance(refs, (list, tuple)):
        raise UserError(f"rollout.tools is {refs!r}; give a list of 'path/to/file.py:function' entries")
    if not refs:
        raise UserError("rollout.tools is empty — list at least one tool as 'path/to/file.py:function'")
    tools: list[Tool] = []
    seen: dict[str, str] = {}
    for ref in refs:
        if not isinstance(ref, str):
            raise UserError(f"rollout.tools entry {ref!r} is not a string — write 'path/to/file.py:function'")
        fn = user_code.load_callable(ref, f"tool {ref!r}", "a function with type hints and a docstring")
        tool = make_tool(fn, ref)
        if tool.name in seen:
            raise UserError(
                f"tools {seen[tool.name]!r} and {ref!r} are both named {tool.name!r} — rename one "
                "(the model calls tools by name)"
            )
        seen[tool.name] = ref
        tools.append(tool)
    return tools


def _check_unique(tools: list[Tool]) -> dict[str, Tool]:
    if not tools or not all(isinstance(t, Tool) for t in tools):
        raise UserError("ToolEnv needs a non-empty list of Tool (see rlhf_pg.tools.load_tools / make_tool)")
    by_name: dict[str, Tool] = {}
    for tool in tools:
        if tool.name in by_name:
            raise UserError(f"two tools are named {tool.name!r} — rename one (the model calls tools by name)")
        by_name[tool.name] = tool
    return by_name


# ------------------------------------------------------------------------------------------ calls
@dataclass
class ToolCall:
    """One call the model wrote; ``error`` set means it was malformed (the message the model sees)."""

    name: str | None
    arguments: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


def parse_tool_calls(text: str) -> list[ToolCall]:
    """Every ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` in ``text``, in order.

    No tag → ``[]`` (the model answered). A block whose JSON is invalid, is not an object, has no string
    ``"name"`` or a non-object ``"arguments"`` is a :class:`ToolCall` with ``error`` set, as is an opening
    tag never closed (the turn was cut at its token limit). A missing ``"arguments"`` is ``{}`` (a tool
    without parameters)."""
    calls: list[ToolCall] = []
    pos = 0
    while (start := text.find(CALL_OPEN, pos)) != -1:
        body_start = start + len(CALL_OPEN)
        end = text.find(CALL_CLOSE, body_start)
        if end == -1:
            calls.append(ToolCall(None, {}, f"error: the tool call has no closing {CALL_CLOSE} tag; {FORMAT_HINT}"))
            break
        calls.append(_parse_block(text[body_start:end]))
        pos = end + len(CALL_CLOSE)
    return calls


def _parse_block(body: str) -> ToolCall:
    try:
        obj = json.loads(body)
    except ValueError as exc:
        return ToolCall(None, {}, f"error: the tool call is not valid JSON ({one_line(exc, 120)}); {FORMAT_HINT}")
    if not isinstance(obj, dict):
        return ToolCall(None, {}, f"error: the tool call is a JSON {_json_type(obj)}, not an object; {FORMAT_HINT}")
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        problem = 'has no "name"' if name is None else f'has a "name" that is a JSON {_json_type(name)}'
        return ToolCall(None, {}, f"error: the tool call {problem}; {FORMAT_HINT}")
    arguments = obj.get("arguments", {})
    if not isinstance(arguments, dict):
        return ToolCall(
            name,
            {},
            f'error: the "arguments" of the call to {name!r} are a JSON {_json_type(arguments)}, not an object; '
            f"{FORMAT_HINT}",
        )
    return ToolCall(name, arguments)


def _json_type(x: Any) -> str:
    if isinstance(x, bool):
        return "boolean"
    if isinstance(x, (int, float)):
        return "number"
    return {str: "string", list: "array", dict: "object", type(None): "null"}.get(type(x), type(x).__name__)


def load_parser(ref: str) -> Callable[[str], list[ToolCall]]:
    """``rollout.tool_parser`` → a parser ``text -> list[ToolCall]`` around the user's ``fn(text) -> list``.

    The items may be :class:`ToolCall` (set ``error`` to report a malformed call to the model) or dicts
    ``{"name": str, "arguments": dict}``. Checked now on an empty text (it must return ``[]``: a turn
    without a call ends the episode, so a parser that finds calls in nothing would never let it end),
    and on every text after: a wrong return type is a UserError (a bug in the parser); an exception on
    a given text becomes an error call the model sees (the text was one the parser could not read)."""
    what = f"tool parser {ref!r}"
    fn = user_code.load_callable(ref, what, "a function fn(text) -> list of ToolCall or {'name', 'arguments'} dicts")

    def parse(text: str) -> list[ToolCall]:
        try:
            raw = fn(text)
        except UserError:
            raise
        except Exception as exc:
            reason = f"{type(exc).__name__}: {one_line(exc, 200)}"
            return [ToolCall(None, {}, f"error: the tool call could not be parsed ({reason})")]
        return _check_parsed(raw, what)

    try:
        empty = fn("")
    except Exception as exc:
        raise UserError(
            f"{what} raised {type(exc).__name__} on an empty text: {one_line(exc)} — return [] when the text has "
            "no tool call"
        ) from exc
    if _check_parsed(empty, what):
        raise UserError(f"{what} found calls in an empty text — return [] when the text has no tool call")
    parse.name = ref  # type: ignore[attr-defined]
    return parse


def _check_parsed(raw: Any, what: str) -> list[ToolCall]:
    fix = (
        "return a list of ToolCall or {'name': str, 'arguments': dict} (rlhf_pg.tools.ToolCall with error= "
        "for a malformed call)"
    )
    if not isinstance(raw, list):
        raise UserError(f"{what} returned a {type(raw).__name__} — {fix}")
    calls: list[ToolCall] = []
    for i, item in enumerate(raw):
        if isinstance(item, dict):
            item = ToolCall(item.get("name"), item.get("arguments", {}))  # type: ignore[arg-type]
        if not isinstance(item, ToolCall):
            raise UserError(f"{what} returned item {i} of type {type(item).__name__} — {fix}")
        if item.error is not None:
            if not isinstance(item.error, str) or not item.error:
                raise UserError(f"{what} returned item {i} with error {item.error!r} — an error is a non-empty string")
        elif not isinstance(item.name, str) or not item.name or not isinstance(item.arguments, dict):
            raise UserError(
                f"{what} returned item {i} with name {item.name!r} and arguments of type "
                f"{type(item.arguments).__name__} — {fix}"
            )
        calls.append(item)
    return calls


# ---------------------------------------------------------------------------------------- running
@dataclass
class ToolResult:
    """What a call produced: the text the model sees, and whether it is an error."""

    content: str
    error: bool = False


def run_tool(tool: Tool, arguments: dict[str, Any], timeout_s: float) -> ToolResult:
    """Call ``tool`` with ``arguments`` (keywords), waiting at most ``timeout_s`` seconds.

    Never raises for the model's sake: arguments that do not bind to the signature, an exception, a
    timeout all become error results. The value becomes text as ``str(value)`` (dicts, lists and
    tuples as JSON). A synchronous tool that times out is abandoned, not stopped (see the module
    docstring); an ``async def`` tool is cancelled."""
    try:
        inspect.signature(tool.fn).bind(**arguments)
    except TypeError as exc:
        return ToolResult(
            f"error: bad arguments for tool {tool.name!r} ({one_line(exc, 120)}); its parameters are "
            f"{_parameters(tool)}",
            True,
        )
    except ValueError:  # no signature to check (some builtins): let the call decide
        pass
    ok, value = _run_async(tool, arguments, timeout_s) if tool.is_async else _run_sync(tool, arguments, timeout_s)
    if ok is None:
        return ToolResult(f"error: tool {tool.name!r} timed out after {timeout_s:g} s", True)
    if ok:
        try:
            return ToolResult(_as_text(value))
        except Exception as exc:  # a __str__ that raises
            ok, value = False, exc
    return ToolResult(f"error: tool {tool.name!r} raised {type(value).__name__}: {one_line(value, 200)}", True)


def _run_sync(tool: Tool, arguments: dict[str, Any], timeout_s: float) -> tuple[bool | None, Any]:
    """(True, value) / (False, exception) / (None, None) on timeout, the call left running."""
    return user_code.call_in_thread(tool.fn, arguments, timeout_s, f"tool-{tool.name}")


def _run_async(tool: Tool, arguments: dict[str, Any], timeout_s: float) -> tuple[bool | None, Any]:
    async def guarded() -> tuple[bool, Any]:
        # the tool's own exceptions (a TimeoutError of its own included) are caught here, so a TimeoutError
        # out of wait_for below is ours
        try:
            return True, await tool.fn(**arguments)
        except Exception as exc:
            return False, exc

    async def main() -> tuple[bool | None, Any]:
        try:
            return await asyncio.wait_for(guarded(), timeout_s)
        except asyncio.TimeoutError:
            return None, None

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(main())
    with concurrent.futures.ThreadPoolExecutor(1) as pool:  # a loop already runs in this thread (a notebook)
        return pool.submit(asyncio.run, main()).result()


def _as_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (dict, list, tuple)):
        try:
            return json.dumps(value, ensure_ascii=False)
        except (TypeError, ValueError):
            pass
    return str(value)


def _parameters(tool: Tool) -> str:
    params = tool.schema["function"].get("parameters", {})
    required = set(params.get("required", []))
    items = [
        f"{name} ({spec.get('type', 'any')}{'' if name in required else ', optional'})"
        for name, spec in params.get("properties", {}).items()
    ]
    return ", ".join(items) or "none"


def run_call(call: ToolCall, tools: dict[str, Tool], timeout_s: float) -> ToolResult:
    """One parsed call → its result: the parser's error, an unknown name, or :func:`run_tool`."""
    if call.error is not None:
        return ToolResult(call.error, True)
    tool = tools.get(call.name or "")
    if tool is None:
        return ToolResult(f"error: unknown tool {call.name!r}; available tools: {', '.join(sorted(tools))}", True)
    return run_tool(tool, call.arguments, timeout_s)


# ----------------------------------------------------------------------------------------- prompt
_EXAMPLE_VALUES: dict[str, Any] = {"integer": 1, "number": 1.5, "string": "text", "boolean": True, "array": []}


def _example_value(spec: dict[str, Any]) -> Any:
    """A placeholder value of a parameter's schema type, for the example call."""
    if spec.get("enum"):
        return spec["enum"][0]
    kind = spec.get("type")
    if isinstance(kind, list):  # a Union: its first type
        kind = next((k for k in kind if k != "null"), None)
    return _EXAMPLE_VALUES.get(kind, {}) if isinstance(kind, str) else "text"


def tools_prompt(tools: list[Tool], call_format: bool = True) -> str:
    """The system-prompt text: the tools' schemas (one JSON line each), the call format and one example
    call (to the first tool, with placeholder values for its required parameters). Short, because small
    models read it on every episode; worded after Qwen's tool prompt, which such models were trained on.
    ``call_format`` False (a user parser with its own format, which the prompts explain): one line per
    tool, ``name(parameters): description``, and nothing about tags."""
    if not tools:
        raise UserError("tools_prompt needs at least one tool")
    if not call_format:
        return "You have these tools:\n" + "\n".join(
            f"{t.name}({_parameters(t)}): {t.schema['function'].get('description', '')}" for t in tools
        )
    first = tools[0].schema["function"]
    params = first.get("parameters", {})
    example_args = {
        name: _example_value(spec)
        for name, spec in params.get("properties", {}).items()
        if name in params.get("required", [])
    }
    example = json.dumps({"name": first["name"], "arguments": example_args}, ensure_ascii=False)
    lines = [
        "You may call tools. Their signatures, one per line:",
        *(json.dumps(t.schema, ensure_ascii=False) for t in tools),
        "To call a tool, write a JSON object with its name and arguments between tags:",
        f'{CALL_OPEN}{{"name": <tool name>, "arguments": <arguments as a JSON object>}}{CALL_CLOSE}',
        f"For example: {CALL_OPEN}{example}{CALL_CLOSE}",
        f"Each result comes back between {RESPONSE_OPEN} and {RESPONSE_CLOSE}. "
        "When you know the answer, reply without a tool call.",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ environment
class ToolEnv(Environment):
    """The environment of a tool recipe: runs the model's calls, answers with one message per call.

    One instance can serve every episode (it keeps no per-episode state). ``role`` is the role of the
    result messages (``"tool"``; use ``"user"`` for a template without a tool role — Qwen's template
    already wraps ``tool`` messages in ``<tool_response>``, so with it ``"user"`` renders what it was
    trained on). ``max_calls_per_turn`` bounds the work one turn can ask for; the extra calls get an
    error result (and count as calls and errors). ``describe_format`` False leaves the tagged call
    format out of the system prompt (for a user parser whose format the prompts explain)."""

    info_keys = ("tool_calls", "tool_errors")
    """Logged per episode as episode/tool_calls and episode/tool_errors."""

    def __init__(
        self,
        tools: list[Tool],
        parser: Callable[[str], list[ToolCall]] = parse_tool_calls,
        timeout_s: float = 10.0,
        role: str = "tool",
        max_calls_per_turn: int = 4,
        describe_format: bool = True,
    ):
        self.tools = _check_unique(list(tools))
        if not callable(parser):
            raise UserError(f"ToolEnv parser is a {type(parser).__name__}, not callable — give fn(text) -> list")
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not timeout_s > 0:
            raise UserError(f"rollout.tool_timeout_s is {timeout_s!r}; give a positive number of seconds")
        if not math.isfinite(timeout_s):
            raise UserError(f"rollout.tool_timeout_s is {timeout_s!r}; give a finite number of seconds")
        if not isinstance(role, str) or not role:
            raise UserError(f"ToolEnv role is {role!r}; give a chat role such as 'tool' or 'user'")
        if isinstance(max_calls_per_turn, bool) or not isinstance(max_calls_per_turn, int) or max_calls_per_turn < 1:
            raise UserError(f"ToolEnv max_calls_per_turn is {max_calls_per_turn!r}; give an integer >= 1")
        self.parser, self.timeout_s, self.role, self.max_calls = parser, float(timeout_s), role, max_calls_per_turn
        self.system_prompt = tools_prompt(list(self.tools.values()), call_format=describe_format)

    def reset(self, row: dict[str, Any]) -> Messages:
        """The row's chat messages with the tools prompt in the system message (prepended to an existing
        first system message, or as a new one)."""
        prompt = row.get("prompt") if isinstance(row, dict) else None
        if not isinstance(prompt, list) or not prompt or not all(is_message(m) for m in prompt):
            raise UserError(
                f"a tool episode got prompt {preview(prompt, 60)}; tools need conversational prompts (a 'prompt' "
                'column of [{"role": ..., "content": ...}] messages) — convert the dataset\'s prompts to messages'
            )
        messages = [dict(m) for m in prompt]
        if messages[0]["role"] == "system":
            rest = messages[0]["content"]
            messages[0]["content"] = f"{self.system_prompt}\n\n{rest}" if rest else self.system_prompt
        else:
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        return messages

    def step(self, text: str, token_ids: list[int]) -> EnvStep:
        """Run the turn's calls; a turn without a call ends the episode."""
        calls = self.parser(text)
        if not calls:
            return EnvStep(None, done=True, info={"tool_calls": 0, "tool_errors": 0})
        results = [
            run_call(call, self.tools, self.timeout_s)
            if i < self.max_calls
            else ToolResult(
                f"error: too many tool calls in one turn (at most {self.max_calls}); this call was not run", True
            )
            for i, call in enumerate(calls)
        ]
        observation = [{"role": self.role, "content": f"{RESPONSE_OPEN}{r.content}{RESPONSE_CLOSE}"} for r in results]
        return EnvStep(observation, info={"tool_calls": len(calls), "tool_errors": sum(r.error for r in results)})


def load_tool_env(
    tools: list[str], tool_parser: str | None = None, tool_timeout_s: float = 10.0, **kwargs: Any
) -> Callable[[], ToolEnv]:
    """``rollout.tools`` / ``tool_parser`` / ``tool_timeout_s`` → a factory of :class:`ToolEnv`, everything
    loaded and checked now; shaped like :func:`rlhf_pg.envs.load_environment`'s factory (``.name`` =
    ``"tools"``). ``kwargs`` go to ToolEnv (``role``, ``max_calls_per_turn``)."""
    loaded = load_tools(tools)
    parser = load_parser(tool_parser) if tool_parser else parse_tool_calls
    kwargs.setdefault("describe_format", tool_parser is None)  # a user's format is theirs to explain
    env = ToolEnv(loaded, parser=parser, timeout_s=tool_timeout_s, **kwargs)

    def make() -> ToolEnv:
        return env  # stateless between episodes: one instance serves them all

    make.name = "tools"  # type: ignore[attr-defined]
    return make
