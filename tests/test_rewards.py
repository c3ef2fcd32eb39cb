"""Tests of rlhf_pg.rewards: the built-ins, loading user functions, RewardSet scoring and policies.

Expected values are derived by hand in the comments next to them.
"""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from rlhf_pg.errors import UserError
from rlhf_pg.rewards import (
    REWARD_REGISTRY,
    RewardModelScorer,
    RewardOutput,
    RewardSet,
    RewardSpec,
    _vader,
    accuracy,
    banned_word_penalty,
    last_number,
    load_reward_function,
    register_reward,
)

FIXTURES = Path(__file__).parent / "fixtures"
FIXTURE_FILE = FIXTURES / "custom_reward.py"
NAN = float("nan")


def score(
    specs: list[RewardSpec],
    completions: list[str],
    columns: dict[str, list] | None = None,
    ids: list[list[int]] | None = None,
    **options: Any,
) -> RewardOutput:
    """Run a RewardSet on string prompts "p0", "p1", ...; ids default to one token per word."""
    prompts = [f"p{i}" for i in range(len(completions))]
    ids = ids if ids is not None else [list(range(len(c.split()))) for c in completions]
    return RewardSet(specs, **options)(prompts, completions, ids, columns or {})


def error_message(excinfo: pytest.ExceptionInfo, *needles: str) -> str:
    """The UserError's message, checked to be one line that contains every needle."""
    message = str(excinfo.value)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, (needle, message)
    return message


def assert_close(tensor: torch.Tensor, expected: list) -> None:
    assert tensor.dtype == torch.float32
    torch.testing.assert_close(tensor, torch.tensor(expected, dtype=torch.float32), equal_nan=True)


@pytest.fixture
def fn_registry(monkeypatch: pytest.MonkeyPatch):
    """Register test-local reward functions for the duration of one test."""

    def add(name: str, fn: Any) -> None:
        monkeypatch.setitem(REWARD_REGISTRY, name, fn)

    return add


# ---------------------------------------------------------------------------------------------
# Built-ins


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("I think 3, no 42.", 42.0),
        ("-7", -7.0),
        ("that makes 1,234 apples", 1234.0),
        ("3.50", 3.5),
        ("$1,234,567.25 in total", 1234567.25),
        ("x = -0.5.", -0.5),
        ("pages 5-7", 7.0),  # a hyphen right after a digit is a range, not a minus sign
        ("1,2,3", 3.0),  # commas not followed by three digits separate numbers
        ("no number here", None),
        ("", None),
    ],
)
def test_last_number(text: str, expected: float | None) -> None:
    assert last_number(text) == expected


@pytest.mark.parametrize(
    ("completion", "answer", "expected"),
    [
        ("I think 3, no 42.", "42", 1.0),
        ("I think 42, no 3.", "42", 0.0),
        ("The answer is 42", "#### 42", 1.0),
        ("42", "42.0", 1.0),
        ("42", 42, 1.0),
        ("42", 42.0, 1.0),
        ("3.50", "3.5", 1.0),
        ("It is 1,234.", "1234", 1.0),
        ("-7", "-7", 1.0),
        ("-7", "7", 0.0),
        ("no number", "42", 0.0),
        ("41.99", "42", 0.0),
        ("42.0000000001", "42", 1.0),  # within the 1e-6 tolerance
        ("7 apples", "3 + 4 = 7 apples in all.\n#### 7", 1.0),  # a GSM8K solution: its last number
        ("1,234", "#### 1,234", 1.0),
    ],
)
def test_accuracy(completion: str, answer: Any, expected: float) -> None:
    assert accuracy(["q"], [completion], answer=[answer]) == [expected]


def test_accuracy_missing_answers_give_none() -> None:
    assert accuracy(["q"] * 4, ["1", "1", "1", "1"], answer=[None, NAN, "  ", "1"]) == [None, None, None, 1.0]


def test_accuracy_without_answer_column_is_a_user_error_even_with_on_error_zero() -> None:
    with pytest.raises(UserError) as excinfo:
        score([RewardSpec("accuracy")], ["42"], on_error="zero")
    error_message(excinfo, "'accuracy'", "'answer' column")


def test_accuracy_answer_without_number() -> None:
    with pytest.raises(UserError) as excinfo:
        score([RewardSpec("accuracy")], ["42", "1"], {"answer": ["42", "forty-two"]})
    error_message(excinfo, "'accuracy'", "'forty-two'", "sample 1")


def test_format_default_pattern_accepts_a_bare_number() -> None:
    completions = ["42", "  -3.5 \n", "1,234", "The answer is 42", "", "4 2"]
    out = score([RewardSpec("format")], completions)
    assert_close(out.per_function["format"], [1.0, 1.0, 1.0, 0.0, 0.0, 0.0])


def test_format_custom_pattern() -> None:
    spec = RewardSpec("format", kwargs={"pattern": r"(?s)<think>.*</think>\s*<answer>\d+</answer>"})
    completions = [
        "<think>2+2\nis 4</think> <answer>4</answer>",
        "<answer>4</answer>",
        "<think></think><answer>x</answer>",
    ]
    assert_close(score([spec], completions).scores, [1.0, 0.0, 0.0])


def test_format_invalid_pattern() -> None:
    with pytest.raises(UserError) as excinfo:
        score([RewardSpec("format", kwargs={"pattern": "(unclosed"})], ["1"])
    error_message(excinfo, "'format'", "'(unclosed'")


def test_length_penalty() -> None:
    ids = [[], [1] * 5, [1] * 250]
    # defaults target=0, scale=100: -0/100, -5/100, -250/100
    assert_close(score([RewardSpec("length_penalty")], ["", "a", "b"], ids=ids).scores, [0.0, -0.05, -2.5])
    # target=100, scale=50: 0 and 5 tokens are under the target; (250 - 100) / 50 = 3
    spec = RewardSpec("length_penalty", kwargs={"target": 100, "scale": 50})
    assert_close(score([spec], ["", "a", "b"], ids=ids).scores, [0.0, 0.0, -3.0])


def test_length_penalty_rejects_nonpositive_scale() -> None:
    with pytest.raises(UserError) as excinfo:
        score([RewardSpec("length_penalty", kwargs={"scale": 0})], ["a"])
    error_message(excinfo, "'length_penalty'", "scale")


def test_sentiment() -> None:
    out = score([RewardSpec("sentiment")], ["I love this, it is wonderful!", "This is terrible and awful.", ""])
    positive, negative, empty = out.scores.tolist()
    assert 0.5 < positive <= 1.0
    assert -1.0 <= negative < -0.5
    assert empty == 0.0  # VADER's compound score of no words


def test_sentiment_without_vader(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "vaderSentiment", None)  # makes the import fail
    monkeypatch.setitem(sys.modules, "vaderSentiment.vaderSentiment", None)
    _vader.cache_clear()
    try:
        with pytest.raises(UserError) as excinfo:
            score([RewardSpec("sentiment")], ["good"])
    finally:
        _vader.cache_clear()
    error_message(excinfo, "'sentiment'", "pip install vaderSentiment")


def test_banned_word_penalty_matches_whole_words_in_each_token() -> None:
    tokens = [[" Sorry", "thereby", " the", "unfortunately,"], []]
    out = banned_word_penalty(["q", "q"], ["", ""], completion_tokens=tokens, words=["sorry", "the", "unfortunately"])
    assert out == [[-0.1, 0.0, -0.1, -0.1], []]
    assert banned_word_penalty(["q"], [""], completion_tokens=[[" sorry", "!"]], penalty=-1.0) == [[-1.0, 0.0]]


def word_tokenizer(words: list[str]) -> Any:
    """An offline word-level fast tokenizer: one token per whitespace-separated word."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", *words])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]")


def test_banned_word_penalty_through_reward_set_with_tokenizer() -> None:
    tok = word_tokenizer("i am sorry the cat sat good bad 42 .".split())
    completions = ["i am sorry the cat", "good cat", "sorry sorry"]
    ids = [tok(c)["input_ids"] for c in completions]
    rewards = RewardSet([RewardSpec("banned_word_penalty"), RewardSpec("format")], tokenizer=tok)
    out = rewards(["p"] * 3, completions, ids, {})
    # default words ("sorry", "unfortunately"), penalty -0.1 on each matching token; format is 0 here
    assert_close(out.per_function["banned_word_penalty"], [-0.1, 0.0, -0.2])
    assert_close(out.token_rewards, [[0, 0, -0.1, 0, 0], [0, 0, 0, 0, 0], [-0.1, -0.1, 0, 0, 0]])
    assert_close(out.scores, [-0.1, 0.0, -0.2])


def test_banned_word_penalty_without_tokenizer() -> None:
    with pytest.raises(UserError) as excinfo:
        score([RewardSpec("banned_word_penalty")], ["sorry"])
    error_message(excinfo, "'banned_word_penalty'", "tokenizer=")


# ---------------------------------------------------------------------------------------------
# RewardSet: combining functions


def test_every_function_gets_columns_and_toolkit_keywords(fn_registry) -> None:
    seen: dict[str, Any] = {}

    def record(prompts: list, completions: list[str], **kwargs: Any) -> list[float]:
        seen.update(kwargs, prompts=prompts, completions=completions)
        return [0.0] * len(completions)

    fn_registry("record", record)
    chat = [[{"role": "user", "content": "hi"}], [{"role": "user", "content": "yo"}]]
    rewards = RewardSet([RewardSpec("record")])
    rewards(chat, ["a", "b c"], [[5], [6, 7]], {"answer": ["1", "2"]}, prompt_text=["<u>hi", "<u>yo"])
    log_extra, log_metric = seen.pop("log_extra"), seen.pop("log_metric")
    assert callable(log_extra) and callable(log_metric)
    assert seen == {  # TRL's keywords (conversational data: completions as assistant messages), then ours
        "prompts": chat,
        "completions": [[{"role": "assistant", "content": "a"}], [{"role": "assistant", "content": "b c"}]],
        "answer": ["1", "2"],
        "completion_ids": [[5], [6, 7]],
        "trainer_state": None,
        "prompt_text": ["<u>hi", "<u>yo"],
        "turns": [["a"], ["b c"]],  # one model turn per completion outside episodes
    }


def test_prompt_text_defaults_to_string_prompts(fn_registry) -> None:
    fn_registry("prompt_len", lambda prompts, completions, prompt_text, **kw: [float(len(p)) for p in prompt_text])
    out = RewardSet([RewardSpec("prompt_len")])(["abc", "de"], ["x", "y"], [[1], [1]], {})
    assert_close(out.scores, [3.0, 2.0])


def test_weighted_sum_and_per_function_values() -> None:
    specs = [
        RewardSpec(f"{FIXTURE_FILE}:echo_score", weight=2.0),
        RewardSpec(f"{FIXTURE_FILE}:contains_keyword", weight=-0.5, kwargs={"keyword": "YES"}),
    ]
    out = score(specs, ["yes", "no", "Yes!"], {"score": [1.0, 3.0, -1.0]})
    assert list(out.per_function) == ["echo_score", "contains_keyword"]
    assert_close(out.per_function["echo_score"], [1.0, 3.0, -1.0])
    assert_close(out.per_function["contains_keyword"], [1.0, 0.0, 1.0])
    # 2*1 - 0.5*1 = 1.5; 2*3 - 0 = 6; 2*(-1) - 0.5*1 = -2.5
    assert_close(out.scores, [1.5, 6.0, -2.5])
    assert out.token_rewards is None  # every function returned scalars


def test_none_is_nan_in_per_function_and_zero_in_scores() -> None:
    specs = [RewardSpec(f"{FIXTURE_FILE}:echo_score", weight=3.0), RewardSpec("format")]
    out = score(specs, ["1", "x"], {"score": [None, 2.0]})
    assert_close(out.per_function["echo_score"], [NAN, 2.0])
    assert_close(out.scores, [1.0, 6.0])  # 3*None(=0) + 1; 3*2 + 0


def test_scalar_rewards_sit_on_the_last_real_token() -> None:
    specs = [
        RewardSpec(f"{FIXTURE_FILE}:echo_score", weight=2.0),
        RewardSpec(f"{FIXTURE_FILE}:per_token_index", weight=0.0),  # only to make token_rewards exist
    ]
    # lengths 3, 1, 0: the scalar goes to index 2, 0 and (empty completion) 0; T = 3
    out = score(specs, ["a", "b", ""], {"score": [1.0, -1.0, 0.5]}, ids=[[7, 8, 9], [7], []])
    assert_close(out.token_rewards, [[0, 0, 2.0], [-2.0, 0, 0], [1.0, 0, 0]])
    assert_close(out.token_rewards.sum(-1), out.scores.tolist())


def test_dense_rewards_are_aligned_and_summed() -> None:
    specs = [RewardSpec(f"{FIXTURE_FILE}:per_token_index", weight=2.0), RewardSpec(f"{FIXTURE_FILE}:echo_score")]
    out = score(specs, ["a b c", "d e"], {"score": [10.0, None]}, ids=[[1, 2, 3], [4, 5]])
    # dense rows [0, 1, 2] and [0, 1] (+ padding 0), weighted by 2; the scalar 10 joins token 2 of row 0
    assert_close(out.per_function["per_token_index"], [3.0, 1.0])
    assert_close(out.token_rewards, [[0.0, 2.0, 14.0], [0.0, 2.0, 0.0]])
    assert_close(out.scores, [16.0, 2.0])  # 2*3 + 10; 2*1 + 0


def test_all_empty_completions_still_have_one_token_column() -> None:
    out = score([RewardSpec(f"{FIXTURE_FILE}:per_token_index")], ["", ""], ids=[[], []])
    assert out.token_rewards.shape == (2, 1)
    assert_close(out.scores, [0.0, 0.0])


def test_tensor_and_numpy_like_returns_are_accepted(fn_registry) -> None:
    fn_registry("as_tensor", lambda prompts, completions, **kw: torch.tensor([0.5] * len(completions)))
    fn_registry("zero_dim", lambda prompts, completions, **kw: [torch.tensor(1.0), True])
    out = score([RewardSpec("as_tensor"), RewardSpec("zero_dim")], ["a", "b"])
    assert_close(out.scores, [1.5, 1.5])


def test_display_names_are_unique() -> None:
    specs = [
        RewardSpec("format"),
        RewardSpec("format", kwargs={"pattern": "x"}),
        RewardSpec(f"{FIXTURE_FILE}:contains_keyword"),
        RewardSpec("format"),
    ]
    assert RewardSet(specs).names == ["format", "format#2", "contains_keyword", "format#3"]


# ---------------------------------------------------------------------------------------------
# RewardSet: policies and errors


def test_on_error_raise_names_function_and_sample_count() -> None:
    with pytest.raises(UserError) as excinfo:
        score([RewardSpec(f"{FIXTURE_FILE}:fails")], ["a", "b", "c"])
    message = error_message(excinfo, "reward function 'fails' raised ValueError", "3 samples", "bad input second line")
    assert message.endswith("fix the function or set rewards.on_error=zero")


def test_on_error_zero_makes_values_none_and_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    rewards = RewardSet([RewardSpec(f"{FIXTURE_FILE}:fails"), RewardSpec("format")], on_error="zero")
    with caplog.at_level(logging.WARNING, logger="rlhf_pg.rewards"):
        for _ in range(2):
            out = rewards(["p", "p"], ["1", "x"], [[1], [1]], {})
    assert_close(out.per_function["fails"], [NAN, NAN])
    assert_close(out.scores, [1.0, 0.0])
    assert len(caplog.records) == 1 and "'fails'" in caplog.records[0].getMessage()


@pytest.mark.parametrize(
    ("function", "needles"),
    [
        ("too_few", ["'too_few'", "returned 2 values for 3 completions"]),
        ("not_a_list", ["'not_a_list'", "returned float, not a list"]),
        ("dense_wrong_length", ["'dense_wrong_length'", "2 per-token rewards for sample 0", "1 completion tokens"]),
    ],
)
def test_wrong_return_shape(function: str, needles: list[str]) -> None:
    with pytest.raises(UserError) as excinfo:
        score([RewardSpec(f"{FIXTURE_FILE}:{function}")], ["a", "b", "c"], on_nonfinite="zero", on_error="zero")
    error_message(excinfo, *needles)


def test_nonfinite_raise_names_function_and_sample() -> None:
    with pytest.raises(UserError) as excinfo:
        score([RewardSpec(f"{FIXTURE_FILE}:nan_on_second")], ["a", "b", "c"])
    error_message(excinfo, "'nan_on_second'", "nan", "sample 1", "rewards.on_nonfinite")


def test_non_number_is_treated_like_nonfinite(fn_registry) -> None:
    fn_registry("stringly", lambda prompts, completions, **kw: ["1.0"] * len(completions))
    with pytest.raises(UserError) as excinfo:
        score([RewardSpec("stringly")], ["a"])
    error_message(excinfo, "'stringly'", "'1.0' (str)", "sample 0")
    assert_close(score([RewardSpec("stringly")], ["a"], on_nonfinite="zero").scores, [0.0])


@pytest.mark.parametrize(("policy", "expected"), [("zero", [1.0, 0.0, 1.0]), ("none", [1.0, NAN, 1.0])])
def test_nonfinite_zero_or_none(policy: str, expected: list[float]) -> None:
    specs = [RewardSpec(f"{FIXTURE_FILE}:nan_on_second")]
    out = score(specs, ["a", "b", "c"], on_nonfinite=policy, on_all_none="zero")
    assert_close(out.per_function["nan_on_second"], expected)
    assert_close(out.scores, [1.0, 0.0, 1.0])


def test_nonfinite_inside_a_dense_list(fn_registry) -> None:
    fn_registry("dense_inf", lambda prompts, completions, **kw: [[1.0, math.inf] for _ in completions])
    ids = [[1, 2]]
    assert_close(score([RewardSpec("dense_inf")], ["a"], ids=ids, on_nonfinite="zero").token_rewards, [[1.0, 0.0]])
    out = score([RewardSpec("dense_inf"), RewardSpec("format")], ["a"], ids=ids, on_nonfinite="none")
    assert_close(out.per_function["dense_inf"], [NAN])
    with pytest.raises(UserError) as excinfo:
        score([RewardSpec("dense_inf")], ["a"], ids=ids)
    error_message(excinfo, "'dense_inf'", "inf", "sample 0")


def test_all_none_raise_names_the_sample() -> None:
    with pytest.raises(UserError) as excinfo:
        score([RewardSpec("accuracy")], ["1", "2"], {"answer": ["1", None]})
    error_message(excinfo, "sample 1", "'p1'", "rewards.on_all_none=zero")


def test_all_none_zero_scores_zero() -> None:
    out = score([RewardSpec("accuracy")], ["1", "2"], {"answer": ["1", None]}, on_all_none="zero")
    assert_close(out.scores, [1.0, 0.0])
    assert_close(out.per_function["accuracy"], [1.0, NAN])


def test_column_named_like_a_toolkit_keyword() -> None:
    with pytest.raises(UserError) as excinfo:
        score([RewardSpec("format")], ["1"], {"completion_ids": [[1]]})
    error_message(excinfo, "'completion_ids'", "rename the column")


def test_unknown_option_is_rejected_with_a_suggestion() -> None:
    with pytest.raises(UserError) as excinfo:
        RewardSet([RewardSpec("format", kwargs={"patern": "x"})])
    error_message(excinfo, "'format'", "'patern'", "did you mean 'pattern'?")


@pytest.mark.parametrize(
    ("options", "needle"),
    [({"on_error": "ignore"}, "rewards.on_error='ignore'"), ({"on_all_none": "none"}, "rewards.on_all_none='none'")],
)
def test_bad_policy(options: dict, needle: str) -> None:
    with pytest.raises(UserError) as excinfo:
        RewardSet([RewardSpec("format")], **options)
    error_message(excinfo, needle)


def test_no_functions_and_bad_weight() -> None:
    with pytest.raises(UserError) as excinfo:
        RewardSet([])
    error_message(excinfo, "rewards.functions")
    with pytest.raises(UserError) as excinfo:
        RewardSet([RewardSpec("format", weight=math.inf)])
    error_message(excinfo, "'format'", "weight inf")


# ---------------------------------------------------------------------------------------------
# Loading


def test_load_by_registry_name() -> None:
    assert load_reward_function("accuracy") is accuracy


def test_register_reward_adds_and_rejects_duplicates(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("rlhf_pg.rewards.REWARD_REGISTRY", dict(REWARD_REGISTRY))

    @register_reward("always_one")
    def always_one(prompts: list, completions: list[str], **kwargs: Any) -> list[float]:
        return [1.0] * len(completions)

    assert load_reward_function("always_one") is always_one
    with pytest.raises(ValueError):
        register_reward("always_one")(always_one)


def test_load_by_module_and_function(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(FIXTURES))
    monkeypatch.delitem(sys.modules, "custom_reward", raising=False)
    fn = load_reward_function("custom_reward:contains_keyword")
    assert fn.__module__ == "custom_reward"
    assert fn(["q"], ["Yes sir"]) == [1.0]


def test_load_by_relative_and_absolute_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(FIXTURES.parent)
    relative = load_reward_function("fixtures/custom_reward.py:contains_keyword")
    absolute = load_reward_function(f"{FIXTURE_FILE}:contains_keyword")
    assert relative(["q"], ["yes"]) == absolute(["q"], ["yes"]) == [1.0]
    assert relative.__module__ != absolute.__module__  # each load is its own, uniquely named module
    assert relative.__module__ in sys.modules


def test_file_class_is_built_with_kwargs() -> None:
    spec = RewardSpec(f"{FIXTURE_FILE}:KeywordScorer", kwargs={"keyword": "cat", "bonus": 0.5})
    out = score([spec], ["a cat", "a dog"])
    assert list(out.per_function) == ["KeywordScorer"]
    assert_close(out.scores, [0.5, 0.0])


def test_unknown_registry_name_lists_builtins_and_suggests() -> None:
    with pytest.raises(UserError) as excinfo:
        load_reward_function("acuracy")
    error_message(
        excinfo, "'acuracy'", "did you mean 'accuracy'?", "accuracy, banned_word_penalty, format", "file.py:function"
    )


def test_module_not_importable() -> None:
    with pytest.raises(UserError) as excinfo:
        load_reward_function("no_such_module_xyz:reward")
    error_message(excinfo, "module 'no_such_module_xyz'", "No module named 'no_such_module_xyz'", "PYTHONPATH")


def test_module_whose_dependency_is_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "needs_dep.py").write_text("import not_installed_dep_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(UserError) as excinfo:
        load_reward_function("needs_dep:reward")
    error_message(excinfo, "module 'needs_dep'", "not_installed_dep_xyz")


def test_file_that_fails_to_load(tmp_path: Path) -> None:
    broken = tmp_path / "broken.py"
    broken.write_text("def reward(prompts, completions, **kw):\n    return [\n")
    with pytest.raises(UserError) as excinfo:
        load_reward_function(f"{broken}:reward")
    error_message(excinfo, "broken.py", "SyntaxError")


def test_missing_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError) as excinfo:
        load_reward_function("rewards/missing.py:reward")
    error_message(excinfo, "'rewards/missing.py' not found", str(tmp_path / "rewards" / "missing.py"))


def test_missing_function_lists_callables() -> None:
    with pytest.raises(UserError) as excinfo:
        load_reward_function(f"{FIXTURE_FILE}:contains_keywords")
    message = error_message(
        excinfo, "'contains_keywords' not found", "did you mean 'contains_keyword'?", "KeywordScorer"
    )
    assert "Any" not in message.split("callables defined there:")[1]  # imported names are not listed


def test_not_callable() -> None:
    with pytest.raises(UserError) as excinfo:
        load_reward_function(f"{FIXTURE_FILE}:NOT_A_FUNCTION")
    error_message(excinfo, "NOT_A_FUNCTION", "is a int, not callable", "fn(prompts, completions")


def test_malformed_reference() -> None:
    with pytest.raises(UserError) as excinfo:
        load_reward_function("some_module:")
    error_message(excinfo, "'some_module:'", "package.module:name")


def test_documented_example_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(Path(__file__).parents[1])  # the recipe's paths are relative to the repo root
    specs = [
        RewardSpec("examples/my_reward.py:tagged_answer", weight=0.5, kwargs={"tag": "answer"}),
        RewardSpec("examples/my_reward.py:repeated_token_penalty", kwargs={"penalty": -0.05}),
    ]
    completions = ["<answer> 42 </answer>", "<answer>41</answer>", "no tags"]
    out = score(specs, completions, {"answer": ["42", "42", None]}, ids=[[1, 2], [3, 3, 3], [4, 4]])
    assert_close(out.per_function["tagged_answer"], [1.0, 0.0, NAN])
    assert_close(out.per_function["repeated_token_penalty"], [0.0, -0.1, -0.05])
    # row 0: 0.5 on its last token; row 1: stutters on tokens 1 and 2, 0.5*0 on token 2; row 2: one stutter
    assert_close(out.token_rewards, [[0.0, 0.5, 0.0], [0.0, -0.05, -0.05], [0.0, -0.05, 0.0]])
    assert_close(out.scores, [0.5, -0.1, -0.05])


# ---------------------------------------------------------------------------------------------
# Reward model


@pytest.fixture(scope="module")
def tiny_reward_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random one-label LlamaForSequenceClassification with a word-level tokenizer, saved offline."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    path = tmp_path_factory.mktemp("reward_model")
    words = "the cat sat on a mat i am sorry good bad 42 .".split()
    word_tokenizer(words).save_pretrained(path)
    config = LlamaConfig(
        vocab_size=len(words) + 2,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        num_labels=1,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(path)
    return path


def test_reward_model_scores_are_deterministic_and_batch_independent(tiny_reward_model: Path) -> None:
    prompts = ["the cat", "i am", "good", "bad bad the cat sat on a"]
    completions = [" sat", " sorry .", "", " mat 42"]
    big = RewardModelScorer(str(tiny_reward_model), batch_size=3)
    small = RewardModelScorer(str(tiny_reward_model), batch_size=1)
    first = big(prompts, completions, prompt_text=prompts)
    assert len(first) == 4 and all(math.isfinite(x) for x in first)
    assert len(set(first)) == 4  # different texts, different scores
    assert big(prompts, completions, prompt_text=prompts) == first
    # padding (batch_size 3) must not change a score compared to scoring one text at a time
    torch.testing.assert_close(torch.tensor(small(prompts, completions, prompt_text=prompts)), torch.tensor(first))


def test_reward_model_from_registry(tiny_reward_model: Path) -> None:
    spec = RewardSpec("reward_model", weight=2.0, kwargs={"model": str(tiny_reward_model), "batch_size": 2})
    rewards = RewardSet([spec])
    assert rewards.names == ["reward_model"]
    out = rewards(["the", "a"], [" cat", " mat"], [[1], [2]], {})
    expected = RewardModelScorer(str(tiny_reward_model))(["the", "a"], [" cat", " mat"], prompt_text=["the", "a"])
    assert out.scores.shape == (2,)
    assert_close(out.scores, [2 * x for x in expected])


def test_reward_model_missing(tmp_path: Path) -> None:
    with pytest.raises(UserError) as excinfo:
        RewardSet([RewardSpec("reward_model", kwargs={"model": str(tmp_path / "nope")})])
    error_message(excinfo, "cannot load reward model", "nope", "kwargs.model")


# ---------------------------------------------------------------------------------------------
# Runaway and misbehaving functions


def test_a_reward_function_that_hangs_is_stopped_by_the_timeout(fn_registry) -> None:
    import asyncio
    import threading

    release = threading.Event()

    def hangs(completions, **kwargs):
        release.wait(30)  # would block the run for 30 s
        return [1.0] * len(completions)

    async def hangs_async(completions, **kwargs):
        await asyncio.sleep(30)
        return [1.0] * len(completions)

    fn_registry("hangs", hangs)
    fn_registry("hangs_async", hangs_async)
    fn_registry("ok", lambda completions, **kw: [2.0] * len(completions))
    try:
        for name in ("hangs", "hangs_async"):
            with pytest.raises(UserError) as excinfo:
                RewardSet([RewardSpec(name)], timeout_s=0.2)(["p"], ["c"], [[1]], {})
            error_message(
                excinfo, f"'{name}'", "did not return within rewards.timeout_s=0.2 s", "rewards.on_error=zero"
            )
            # on_error=zero: the overrun counts as None; the other function's value stands
            out = RewardSet([RewardSpec(name), RewardSpec("ok")], on_error="zero", timeout_s=0.2)(
                ["p"], ["c"], [[1]], {}
            )
            assert torch.isnan(out.per_function[name]).all() and out.scores.tolist() == [2.0]
    finally:
        release.set()


def test_a_reward_function_that_edits_its_inputs_cannot_change_the_batch(fn_registry) -> None:
    seen = []

    def vandal(prompts, completions, completion_ids, answer, **kwargs):
        completions[0][0]["content"] = "HACKED"
        completion_ids[0].append(999)
        answer[:] = ["x"] * len(answer)
        prompts.clear()
        return [0.0] * len(completion_ids)

    def reader(completions, answer, **kwargs):
        seen.append((completions[0][0]["content"], list(answer)))
        return [1.0] * len(completions)

    fn_registry("vandal", vandal)
    fn_registry("reader", reader)
    prompts = [[{"role": "user", "content": "hi"}]]
    ids, answer = [[5, 6]], ["1"]
    RewardSet([RewardSpec("vandal"), RewardSpec("reader")])(
        prompts, ["ok"], ids, {"answer": answer}, prompt_text=["hi"]
    )
    assert seen == [("ok", ["1"])]  # the next function saw the original values
    assert prompts == [[{"role": "user", "content": "hi"}]] and ids == [[5, 6]] and answer == ["1"]
