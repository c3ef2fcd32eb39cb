"""Tests of rlhf_pg.tools: describing tools, parsing calls, running them, and the tool environment.

No model is needed: the environment is driven with hand-written turns. Every error the user or the
model sees is checked to be one line.
"""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path
from typing import Any

import pytest

from rlhf_pg import envs
from rlhf_pg.errors import UserError
from rlhf_pg.tools import (
    CALL_CLOSE,
    CALL_OPEN,
    STOP,
    Tool,
    ToolCall,
    ToolEnv,
    ToolResult,
    load_parser,
    load_tool_env,
    load_tools,
    make_tool,
    parse_tool_calls,
    run_call,
    run_tool,
    tools_prompt,
)

ROOT = Path(__file__).resolve().parents[1]
CALCULATOR = ROOT / "examples" / "calculator_tools.py"


def error_message(excinfo: pytest.ExceptionInfo, *needles: str) -> str:
    """The UserError's message, checked to be one line that contains every needle."""
    message = str(excinfo.value)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, (needle, message)
    return message


def one_line_error(content: str, *needles: str) -> str:
    """An error text the model sees: one line, starting with 'error:', containing every needle."""
    assert "\n" not in content, content
    assert content.startswith("error: "), content
    for needle in needles:
        assert needle in content, (needle, content)
    return content


def call(tool: str, /, **arguments: Any) -> str:
    """A well-formed call in the default format."""
    return f"{CALL_OPEN}{json.dumps({'name': tool, 'arguments': arguments})}{CALL_CLOSE}"


def write(tmp_path: Path, source: str, name: str = "my_tools.py") -> Path:
    path = tmp_path / name
    path.write_text(source)
    return path


# --------------------------------------------------------------------------------- test tools
def multiply(a: int, b: int) -> int:
    """Multiply two integers.

    Args:
        a: The first factor.
        b: The second factor.
    """
    return a * b


def greet(name: str, punctuation: str = "!") -> str:
    """Greet someone.

    Args:
        name: Who to greet.
        punctuation: What ends the greeting.
    """
    return f"hello {name}{punctuation}"


def fail(x: int) -> int:
    """Always fails.

    Args:
        x: Ignored.
    """
    raise ValueError(f"bad x\n{x}")


def as_dict(x: int) -> dict:
    """Returns a dict.

    Args:
        x: A number.
    """
    return {"x": x, "list": [1, 2]}


async def async_double(x: int) -> int:
    """Doubles after yielding to the loop.

    Args:
        x: The number.
    """
    await asyncio.sleep(0)
    return 2 * x


@pytest.fixture
def env() -> ToolEnv:
    return ToolEnv([make_tool(multiply), make_tool(greet), make_tool(fail)], max_calls_per_turn=2)


# ------------------------------------------------------------------------------------ loading
def test_schema_from_a_good_function() -> None:
    tool = make_tool(greet)
    assert (tool.name, tool.fn, tool.is_async) == ("greet", greet, False)
    assert tool.schema == {
        "type": "function",
        "function": {
            "name": "greet",
            "description": "Greet someone.",
            "parameters": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "description": "Who to greet."},
                    "punctuation": {"type": "string", "description": "What ends the greeting."},
                },
                "required": ["name"],
            },
            "return": {"type": "string"},
        },
    }
    assert make_tool(async_double).is_async


def test_load_tools_from_the_example_file() -> None:
    tools = load_tools([f"{CALCULATOR}:multiply", f"{CALCULATOR}:add", f"{CALCULATOR}:subtract"])
    assert [t.name for t in tools] == ["multiply", "add", "subtract"]
    assert [run_tool(t, {"a": 12, "b": 34}, 5.0) for t in tools] == [
        ToolResult("408", False),
        ToolResult("46", False),
        ToolResult("-22", False),
    ]


def test_load_tools_with_the_relative_path_of_the_recipe(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    (tool,) = load_tools(["examples/calculator_tools.py:multiply"])
    assert tool.name == "multiply"
    assert tool.schema["function"]["parameters"]["required"] == ["a", "b"]


@pytest.mark.parametrize(
    ("source", "needle"),
    [
        ("def f(a: int) -> int:\n    return a\n", "no docstring"),
        ('def f(a):\n    """Doc.\n\n    Args:\n        a: A.\n    """\n    return a\n', "missing a type hint"),
        ('def f(a: int) -> int:\n    """Doc without an Args section."""\n    return a\n', "no description"),
    ],
    ids=["no-docstring", "no-type-hint", "no-args-entry"],
)
def test_a_function_that_cannot_be_described_is_refused(tmp_path: Path, source: str, needle: str) -> None:
    path = write(tmp_path, source)
    with pytest.raises(UserError) as excinfo:
        load_tools([f"{path}:f"])
    error_message(excinfo, f"tool '{path}:f'", "cannot be described", needle, "type hint", "'Args:'")


def test_duplicate_tool_names_are_refused(tmp_path: Path) -> None:
    other = write(tmp_path, (CALCULATOR.read_text()), "other.py")
    with pytest.raises(UserError) as excinfo:
        load_tools([f"{CALCULATOR}:multiply", f"{other}:multiply"])
    error_message(excinfo, "both named 'multiply'", "rename one")
    with pytest.raises(UserError) as excinfo:
        ToolEnv([make_tool(multiply), make_tool(multiply)])
    error_message(excinfo, "'multiply'", "rename one")


def test_empty_or_non_list_tools_are_refused() -> None:
    with pytest.raises(UserError) as excinfo:
        load_tools([])
    error_message(excinfo, "rollout.tools is empty")
    with pytest.raises(UserError) as excinfo:
        load_tools(f"{CALCULATOR}:multiply")  # type: ignore[arg-type]
    error_message(excinfo, "give a list")
    with pytest.raises(UserError) as excinfo:
        ToolEnv([])
    error_message(excinfo, "non-empty list of Tool")


def test_a_non_callable_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "x = 3\n")
    with pytest.raises(UserError) as excinfo:
        load_tools([f"{path}:x"])
    error_message(excinfo, f"tool '{path}:x'", "not callable")
    with pytest.raises(UserError) as excinfo:
        make_tool(3)  # type: ignore[arg-type]
    error_message(excinfo, "not callable")


def test_a_missing_function_is_a_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(UserError) as excinfo:
        load_tools([f"{CALCULATOR}:multiplY"])
    error_message(excinfo, "did you mean 'multiply'?")


# ------------------------------------------------------------------------------------ parsing
def test_stop_is_the_closing_tag() -> None:
    assert (CALL_OPEN, CALL_CLOSE, STOP) == ("<tool_call>", "</tool_call>", "</tool_call>")


def test_parse_one_call() -> None:
    text = 'Let me compute. <tool_call>\n{"name": "multiply", "arguments": {"a": 12, "b": 34}}\n</tool_call>'
    assert parse_tool_calls(text) == [ToolCall("multiply", {"a": 12, "b": 34}, None)]


def test_parse_two_calls_in_order() -> None:
    text = call("multiply", a=1, b=2) + " then " + call("greet", name="bob")
    assert parse_tool_calls(text) == [ToolCall("multiply", {"a": 1, "b": 2}), ToolCall("greet", {"name": "bob"})]


def test_missing_arguments_are_empty() -> None:
    assert parse_tool_calls('<tool_call>{"name": "now"}</tool_call>') == [ToolCall("now", {})]


@pytest.mark.parametrize(
    ("text", "needles"),
    [
        ('<tool_call>{"name": "multiply", "arguments": {"a": 1,}}</tool_call>', ["not valid JSON"]),
        ("<tool_call>[1, 2]</tool_call>", ["JSON array, not an object"]),
        ('<tool_call>{"arguments": {"a": 1}}</tool_call>', ['no "name"']),
        ('<tool_call>{"name": 3, "arguments": {}}</tool_call>', ['"name" that is a JSON number']),
        (
            '<tool_call>{"name": "multiply", "arguments": "a=1"}</tool_call>',
            ["'multiply'", "JSON string, not an object"],
        ),
        ('<tool_call>{"name": "multiply", "arguments": {"a": 1', ["no closing </tool_call> tag"]),
    ],
    ids=["bad-json", "not-object", "no-name", "name-not-string", "args-not-object", "unclosed"],
)
def test_malformed_calls_are_error_calls(text: str, needles: list[str]) -> None:
    (parsed,) = parse_tool_calls(text)
    assert parsed.error is not None
    one_line_error(parsed.error, *needles, '{"name": "<tool name>", "arguments": {...}}')
    assert parsed.arguments == {}


def test_an_unclosed_call_after_a_good_one() -> None:
    text = call("multiply", a=1, b=2) + '<tool_call>{"name": "greet", "argum'
    good, cut = parse_tool_calls(text)
    assert good == ToolCall("multiply", {"a": 1, "b": 2})
    assert cut.error is not None and "no closing" in cut.error


def test_no_call() -> None:
    assert parse_tool_calls("The answer is 408.") == []
    assert parse_tool_calls("") == []


# -------------------------------------------------------------------------------- user parsers
PARSERS = """
from rlhf_pg.tools import ToolCall

def dicts(text):
    # 'name(a=1)' lines, as dicts
    out = []
    for line in text.splitlines():
        if "(" in line:
            name, _, rest = line.partition("(")
            args = dict(kv.split("=") for kv in rest.rstrip(")").split(",") if kv)
            out.append({"name": name, "arguments": {k: int(v) for k, v in args.items()}})
    return out

def objects(text):
    return [ToolCall(None, {}, "error: cannot read that")] if "?" in text else []

def not_a_list(text):
    return "multiply" if text else []

def bad_item(text):
    return [("multiply", {})] if text else []

def bad_arguments(text):
    return [{"name": "multiply", "arguments": [1, 2]}] if text else []

def raises(text):
    if text:
        raise ValueError("no parse\\nhere")
    return []

def raises_on_empty(text):
    return text.split("(")[1]

def finds_calls_in_nothing(text):
    return [{"name": "multiply", "arguments": {}}]
"""


@pytest.fixture
def parsers(tmp_path: Path) -> Path:
    return write(tmp_path, PARSERS, "parsers.py")


def test_user_parser_returning_dicts(parsers: Path) -> None:
    parse = load_parser(f"{parsers}:dicts")
    assert parse("multiply(a=3,b=4)\nok") == [ToolCall("multiply", {"a": 3, "b": 4})]
    assert parse("nothing") == []
    env = ToolEnv([make_tool(multiply)], parser=parse)
    step = env.step("multiply(a=3,b=4)", [])
    assert step.observation == [{"role": "tool", "content": "<tool_response>12</tool_response>"}]


def test_user_parser_returning_error_calls(parsers: Path) -> None:
    parse = load_parser(f"{parsers}:objects")
    assert parse("what?") == [ToolCall(None, {}, "error: cannot read that")]


@pytest.mark.parametrize(
    ("name", "needles"),
    [
        ("not_a_list", ["returned a str", "return a list of ToolCall"]),
        ("bad_item", ["item 0 of type tuple", "return a list of ToolCall"]),
        ("bad_arguments", ["arguments of type list", "return a list of ToolCall"]),
    ],
)
def test_user_parser_with_wrong_types_is_a_user_error(parsers: Path, name: str, needles: list[str]) -> None:
    parse = load_parser(f"{parsers}:{name}")
    with pytest.raises(UserError) as excinfo:
        parse("multiply(a=1,b=2)")
    error_message(excinfo, f"tool parser '{parsers}:{name}'", *needles)


def test_user_parser_raising_gives_an_error_call(parsers: Path) -> None:
    parse = load_parser(f"{parsers}:raises")
    (parsed,) = parse("anything")
    assert parsed.name is None
    one_line_error(parsed.error or "", "could not be parsed", "ValueError", "no parse here")
    step = ToolEnv([make_tool(multiply)], parser=parse).step("anything", [])
    assert step.info == {"tool_calls": 1, "tool_errors": 1}


@pytest.mark.parametrize(
    ("name", "needles"),
    [
        ("raises_on_empty", ["raised IndexError on an empty text", "return []"]),
        ("finds_calls_in_nothing", ["found calls in an empty text", "return []"]),
    ],
)
def test_user_parser_is_checked_at_load(parsers: Path, name: str, needles: list[str]) -> None:
    with pytest.raises(UserError) as excinfo:
        load_parser(f"{parsers}:{name}")
    error_message(excinfo, *needles)


# ------------------------------------------------------------------------------------ running
def test_run_tool_success_and_conversion() -> None:
    assert run_tool(make_tool(multiply), {"a": 12, "b": 34}, 5.0) == ToolResult("408", False)
    assert run_tool(make_tool(greet), {"name": "ann"}, 5.0) == ToolResult("hello ann!", False)
    assert run_tool(make_tool(as_dict), {"x": 1}, 5.0) == ToolResult('{"x": 1, "list": [1, 2]}', False)


def test_run_tool_exception_is_an_error_result() -> None:
    result = run_tool(make_tool(fail), {"x": 7}, 5.0)
    assert result.error
    assert one_line_error(result.content) == "error: tool 'fail' raised ValueError: bad x 7"


@pytest.mark.parametrize(
    ("arguments", "needle"),
    [({"a": 1}, "missing a required argument: 'b'"), ({"a": 1, "b": 2, "c": 3}, "unexpected keyword argument 'c'")],
)
def test_run_tool_bad_arguments_name_the_parameters(arguments: dict, needle: str) -> None:
    result = run_tool(make_tool(multiply), arguments, 5.0)
    assert result.error
    one_line_error(result.content, "bad arguments for tool 'multiply'", needle, "a (integer), b (integer)")
    result = run_tool(make_tool(greet), {}, 5.0)
    one_line_error(result.content, "name (string), punctuation (string, optional)")


def test_unknown_tool_lists_the_available_ones() -> None:
    tools = {"multiply": make_tool(multiply), "greet": make_tool(greet)}
    result = run_call(ToolCall("divide", {"a": 1}), tools, 5.0)
    assert result.error
    assert one_line_error(result.content) == "error: unknown tool 'divide'; available tools: greet, multiply"


def test_sync_timeout_abandons_the_call() -> None:
    release, finished = threading.Event(), threading.Event()

    def slow(x: int) -> int:
        """Sleeps up to 10 s.

        Args:
            x: Returned.
        """
        release.wait(10)
        finished.set()
        return x

    result = run_tool(make_tool(slow), {"x": 1}, 0.2)
    assert result == ToolResult("error: tool 'slow' timed out after 0.2 s", True)
    assert not finished.is_set()  # abandoned, not stopped: the call is still running in its thread
    release.set()
    assert finished.wait(10)


def test_async_tool_success() -> None:
    assert run_tool(make_tool(async_double), {"x": 21}, 5.0) == ToolResult("42", False)


def test_async_tool_raising() -> None:
    async def broken(x: int) -> int:
        """Raises its own TimeoutError, which is not a timeout of ours.

        Args:
            x: Ignored.
        """
        raise TimeoutError("upstream")

    result = run_tool(make_tool(broken), {"x": 1}, 5.0)
    assert result == ToolResult("error: tool 'broken' raised TimeoutError: upstream", True)


def test_async_timeout_cancels_the_call() -> None:
    cancelled = threading.Event()

    async def hang(x: int) -> int:
        """Sleeps 10 s.

        Args:
            x: Returned.
        """
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return x

    result = run_tool(make_tool(hang), {"x": 1}, 0.2)
    assert result == ToolResult("error: tool 'hang' timed out after 0.2 s", True)
    assert cancelled.is_set()


def test_async_tool_inside_a_running_loop() -> None:
    async def main() -> ToolResult:
        return run_tool(make_tool(async_double), {"x": 5}, 5.0)

    assert asyncio.run(main()) == ToolResult("10", False)


# ------------------------------------------------------------------------------------- prompt
def test_tools_prompt_has_schemas_format_and_a_valid_example() -> None:
    tools = [make_tool(greet), make_tool(multiply)]
    prompt = tools_prompt(tools)
    lines = prompt.splitlines()
    assert json.dumps(tools[0].schema) in lines and json.dumps(tools[1].schema) in lines
    assert '<tool_call>{"name": <tool name>, "arguments": <arguments as a JSON object>}</tool_call>' in lines
    (example_line,) = [line for line in lines if line.startswith("For example: ")]
    (example,) = parse_tool_calls(example_line)
    assert example == ToolCall("greet", {"name": "text"})  # required parameters only
    assert run_call(example, {t.name: t for t in tools}, 5.0) == ToolResult("hello text!", False)


# -------------------------------------------------------------------------------- environment
def test_reset_adds_a_system_message(env: ToolEnv) -> None:
    prompt = [{"role": "user", "content": "What is 12*34?"}]
    messages = env.reset({"prompt": prompt, "answer": 408})
    assert messages == [{"role": "system", "content": env.system_prompt}, prompt[0]]
    assert env.system_prompt == tools_prompt(list(env.tools.values()))
    assert prompt == [{"role": "user", "content": "What is 12*34?"}]  # the row is not modified


def test_reset_prepends_to_an_existing_system_message(env: ToolEnv) -> None:
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "12*34?"}]
    messages = env.reset({"prompt": prompt})
    assert messages == [{"role": "system", "content": env.system_prompt + "\n\nBe brief."}, prompt[1]]
    assert prompt[0]["content"] == "Be brief."


@pytest.mark.parametrize("prompt", ["What is 12*34?", [], [{"role": "user"}], None])
def test_reset_needs_conversational_prompts(env: ToolEnv, prompt: Any) -> None:
    with pytest.raises(UserError) as excinfo:
        env.reset({"prompt": prompt})
    error_message(excinfo, "tools need conversational prompts")


def test_step_without_a_call_ends_the_episode(env: ToolEnv) -> None:
    step = env.step("The answer is 408.", [1, 2, 3])
    assert (step.observation, step.done, step.info) == (None, True, {"tool_calls": 0, "tool_errors": 0})
    checked = envs.as_env_step(step, "tools", 0)
    assert checked.done and checked.observation is None


def test_step_with_a_good_call(env: ToolEnv) -> None:
    step = env.step("I will multiply. " + call("multiply", a=12, b=34), [])
    assert step.observation == [{"role": "tool", "content": "<tool_response>408</tool_response>"}]
    assert (step.done, step.reward, step.info) == (False, None, {"tool_calls": 1, "tool_errors": 0})
    assert envs.as_env_step(step, "tools", 0) is step


def test_step_with_a_malformed_call(env: ToolEnv) -> None:
    step = env.step('<tool_call>{"name": "multiply", "arguments": {"a": 1', [])
    (message,) = step.observation or []
    assert message["role"] == "tool"
    assert message["content"].startswith("<tool_response>error: the tool call has no closing </tool_call> tag")
    assert message["content"].endswith("</tool_response>") and "\n" not in message["content"]
    assert (step.done, step.info) == (False, {"tool_calls": 1, "tool_errors": 1})
    envs.as_env_step(step, "tools", 0)


def test_step_with_too_many_calls(env: ToolEnv) -> None:
    text = call("multiply", a=2, b=3) + call("fail", x=1) + call("greet", name="x") + call("multiply", a=1, b=1)
    step = env.step(text, [])
    contents = [m["content"] for m in step.observation or []]
    assert [m["role"] for m in step.observation or []] == ["tool"] * 4
    assert contents[:2] == [
        "<tool_response>6</tool_response>",
        "<tool_response>error: tool 'fail' raised ValueError: bad x 1</tool_response>",
    ]
    too_many = (
        "<tool_response>error: too many tool calls in one turn (at most 2); this call was not run</tool_response>"
    )
    assert contents[2:] == [too_many, too_many]
    assert step.info == {"tool_calls": 4, "tool_errors": 3}
    envs.as_env_step(step, "tools", 1)


def test_step_with_a_user_role() -> None:
    step = ToolEnv([make_tool(multiply)], role="user").step(call("multiply", a=2, b=2), [])
    assert step.observation == [{"role": "user", "content": "<tool_response>4</tool_response>"}]


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"timeout_s": 0}, "rollout.tool_timeout_s is 0"),
        ({"timeout_s": float("inf")}, "finite"),
        ({"max_calls_per_turn": 0}, "max_calls_per_turn is 0"),
        ({"role": ""}, "role is ''"),
        ({"parser": "json"}, "parser is a str"),
    ],
)
def test_tool_env_checks_its_options(kwargs: dict, needle: str) -> None:
    with pytest.raises(UserError) as excinfo:
        ToolEnv([make_tool(multiply)], **kwargs)
    error_message(excinfo, needle)


def test_load_tool_env_builds_a_checked_factory(parsers: Path) -> None:
    make = load_tool_env([f"{CALCULATOR}:multiply", f"{CALCULATOR}:add"], None, 3.0)
    env = make()
    assert make.name == "tools" and isinstance(env, ToolEnv) and env.timeout_s == 3.0
    assert list(env.tools) == ["multiply", "add"] and all(isinstance(t, Tool) for t in env.tools.values())
    assert env.step(call("add", a=2, b=3), []).observation == [
        {"role": "tool", "content": "<tool_response>5</tool_response>"}
    ]
    custom = load_tool_env([f"{CALCULATOR}:multiply"], f"{parsers}:dicts")()
    assert custom.step("multiply(a=2,b=5)", []).info == {"tool_calls": 1, "tool_errors": 0}
