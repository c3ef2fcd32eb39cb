"""Tests for rlhf_pg.data: the arithmetic task, local files, prompt rendering and errors."""

from __future__ import annotations

import json
import operator
import re
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from transformers import PreTrainedTokenizerBase

from rlhf_pg.data import TASKS, load_prompt_dataset, make_arithmetic
from rlhf_pg.errors import UserError

QUESTION = re.compile(r"What is (\d+) ([-+*]) (\d+)\?")
OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}
STANDARD_ROWS = [
    {"prompt": "Say hi.", "answer": "hi", "id": 0},
    {"prompt": "Count to three.", "answer": "1 2 3", "id": 1},
]
CONVERSATIONAL_ROWS = [
    {"prompt": [{"role": "user", "content": "Say hi."}], "answer": "hi", "id": 0},
    {
        "prompt": [
            {"role": "system", "content": "Be terse."},
            {"role": "user", "content": "Count to three."},
        ],
        "answer": "1 2 3",
        "id": 1,
    },
]


def questions(dataset: Any) -> list[str]:
    """The user message of each conversational row."""
    return [messages[-1]["content"] for messages in dataset["prompt"]]


def write_rows(path: Path, rows: list[dict[str, Any]]) -> Path:
    """Write rows as .jsonl, .json, .csv or .parquet according to the suffix."""
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    elif path.suffix == ".csv":
        pd.DataFrame(rows).to_csv(path, index=False)
    else:
        pd.DataFrame(rows).to_parquet(path)
    return path


def load_file(tmp_path: Path, rows: list[dict[str, Any]], tokenizer: Any, **kwargs: Any) -> Any:
    """Write rows to a .jsonl file and load it."""
    path = write_rows(tmp_path / "rows.jsonl", rows)
    return load_prompt_dataset(str(path), "train", tokenizer=tokenizer, **kwargs)


# ---- arithmetic -------------------------------------------------------------------------------


def test_arithmetic_is_registered() -> None:
    assert "arithmetic" in TASKS


def test_arithmetic_is_deterministic() -> None:
    first = make_arithmetic("train", 50, seed=3)
    second = make_arithmetic("train", 50, seed=3)
    assert first.to_list() == second.to_list()
    assert questions(make_arithmetic("train", 50, seed=4)) != questions(first)


def test_arithmetic_answers_are_correct() -> None:
    dataset = make_arithmetic("train", 300, max_operand=30)
    for question, answer in zip(questions(dataset), dataset["answer"]):
        a, op, b = QUESTION.match(question).groups()
        assert OPS[op](int(a), int(b)) == int(answer)
        assert 0 <= int(a) <= 30 and 0 <= int(b) <= 30


def test_arithmetic_splits_are_disjoint_and_test_is_distinct() -> None:
    train = set(questions(make_arithmetic("train", 5000)))
    test = questions(make_arithmetic("test", 200))
    assert len(test) == len(set(test)) == 200
    assert not train & set(test)
    # Disjoint whatever the sizes: a bigger test split still avoids every train question.
    assert not train & set(questions(make_arithmetic("test", 250)))


def test_arithmetic_ops_and_split_aliases() -> None:
    dataset = make_arithmetic("eval", 40, ops="+")
    assert all(" + " in q for q in questions(dataset))
    assert make_arithmetic("validation", 40, ops="+").to_list() == dataset.to_list()


def test_arithmetic_custom_template() -> None:
    dataset = make_arithmetic("train", 3, template="Compute {a}{op}{b}.")
    assert all(re.fullmatch(r"Compute \d+[-+*]\d+\.", q) for q in questions(dataset))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"split": "dev"}, "has no split 'dev'"),
        ({"ops": "+/"}, "ops '\\+/' is invalid"),
        ({"max_operand": 0}, "max_operand must be >= 1"),
        ({"template": "What is {x}?"}, "template .* is invalid"),
        ({"split": "test", "n": 500, "max_operand": 5}, "too few distinct test questions"),
    ],
)
def test_arithmetic_errors(kwargs: dict[str, Any], message: str) -> None:
    arguments = {"split": "train", "n": 10, **kwargs}
    with pytest.raises(UserError, match=message):
        make_arithmetic(**arguments)


def test_arithmetic_via_loader(tokenizer: PreTrainedTokenizerBase) -> None:
    train = load_prompt_dataset(
        "arithmetic", "train", tokenizer=tokenizer, task_kwargs={"n_train": 30, "max_operand": 9}
    )
    test = load_prompt_dataset("arithmetic", "test", tokenizer=tokenizer, task_kwargs={"n_eval": 7})
    assert (len(train), len(test)) == (30, 7)
    assert train.column_names == ["prompt", "prompt_text", "prompt_ids", "answer"]
    row = train[0]
    assert row["prompt_text"] == tokenizer.apply_chat_template(
        row["prompt"], tokenize=False, add_generation_prompt=True
    )
    assert row["prompt_text"].endswith("<|im_start|>assistant\n")
    assert row["prompt_ids"] == tokenizer(row["prompt_text"], add_special_tokens=False).input_ids


def test_loader_seed_is_the_task_default(tokenizer: PreTrainedTokenizerBase) -> None:
    def load(**kwargs: Any) -> list[str]:
        return questions(load_prompt_dataset("arithmetic", "train", tokenizer=tokenizer, **kwargs))

    kwargs = {"n_train": 20}
    assert load(task_kwargs=kwargs, seed=5) == load(task_kwargs={**kwargs, "seed": 5})
    assert load(task_kwargs=kwargs, seed=5) != load(task_kwargs=kwargs, seed=6)


def test_unknown_task_kwarg_is_a_user_error(tokenizer: PreTrainedTokenizerBase) -> None:
    with pytest.raises(UserError, match="invalid task_kwargs for task 'arithmetic'"):
        load_prompt_dataset("arithmetic", "train", tokenizer=tokenizer, task_kwargs={"n": 3})


def test_task_kwargs_are_ignored_for_files(tmp_path: Path, tokenizer: PreTrainedTokenizerBase) -> None:
    dataset = load_file(tmp_path, STANDARD_ROWS, tokenizer, task_kwargs={"n_train": 3})
    assert len(dataset) == len(STANDARD_ROWS)


def test_system_prompt_and_limit(tokenizer: PreTrainedTokenizerBase) -> None:
    dataset = load_prompt_dataset("arithmetic", "test", tokenizer=tokenizer, system_prompt="Be exact.", limit=5)
    assert len(dataset) == 5
    assert dataset[0]["prompt_text"].startswith("<|im_start|>system\nBe exact.<|im_end|>")
    assert dataset[0]["prompt"][0]["role"] == "user", "the original prompt is kept"
    full = load_prompt_dataset("arithmetic", "test", tokenizer=tokenizer)
    assert dataset["answer"] == full["answer"][:5]


# ---- local files ------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_standard_prompts_from_file(suffix: str, tmp_path: Path, tokenizer: PreTrainedTokenizerBase) -> None:
    path = write_rows(tmp_path / f"data{suffix}", STANDARD_ROWS)
    dataset = load_prompt_dataset(str(path), "test", tokenizer=tokenizer, system_prompt="ignored")
    assert dataset.column_names == ["prompt", "prompt_text", "prompt_ids", "answer", "id"]
    assert dataset["prompt"] == dataset["prompt_text"] == ["Say hi.", "Count to three."]
    assert dataset["answer"] == ["hi", "1 2 3"] and dataset["id"] == [0, 1]
    assert dataset["prompt_ids"][0] == tokenizer("Say hi.", add_special_tokens=False).input_ids


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet"])
def test_conversational_prompts_from_file(suffix: str, tmp_path: Path, tokenizer: PreTrainedTokenizerBase) -> None:
    path = write_rows(tmp_path / f"chat{suffix}", CONVERSATIONAL_ROWS)
    dataset = load_prompt_dataset(str(path), "train", tokenizer=tokenizer, system_prompt="Sys.")
    first, second = dataset["prompt_text"]
    assert first == ("<|im_start|>system\nSys.<|im_end|>\n<|im_start|>user\nSay hi.<|im_end|>\n<|im_start|>assistant\n")
    assert second.startswith("<|im_start|>system\nBe terse.<|im_end|>"), "existing system kept"
    assert "Sys." not in second
    assert dataset["prompt"][0] == CONVERSATIONAL_ROWS[0]["prompt"]
    assert dataset["answer"] == ["hi", "1 2 3"]


def test_prompt_column_is_renamed(tmp_path: Path, tokenizer: PreTrainedTokenizerBase) -> None:
    rows = [{"question": "Q1", "answer": "A1"}]
    path = write_rows(tmp_path / "q.jsonl", rows)
    dataset = load_prompt_dataset(str(path), "train", tokenizer=tokenizer, prompt_column="question")
    assert dataset.column_names == ["prompt", "prompt_text", "prompt_ids", "answer"]
    assert dataset["prompt"] == ["Q1"]


def test_truncation_keeps_the_last_tokens(tmp_path: Path, tokenizer: PreTrainedTokenizerBase) -> None:
    rows = [{"prompt": "one two three four five six seven eight"}, {"prompt": "short"}]
    path = write_rows(tmp_path / "long.jsonl", rows)
    full_ids = tokenizer(rows[0]["prompt"], add_special_tokens=False).input_ids
    with pytest.warns(UserWarning, match="1 of 2 prompts .* left-truncated"):
        dataset = load_prompt_dataset(str(path), "train", tokenizer=tokenizer, max_prompt_tokens=3)
    assert dataset["prompt_ids"][0] == full_ids[-3:]
    assert dataset["prompt_text"][0] == " six seven eight"
    assert dataset["prompt"][0] == rows[0]["prompt"]
    assert dataset["prompt_text"][1] == "short"


# ---- errors -----------------------------------------------------------------------------------


def test_too_long_error(tmp_path: Path, tokenizer: PreTrainedTokenizerBase) -> None:
    rows = [{"prompt": "short"}, {"prompt": "one two three four five"}]
    with pytest.raises(UserError, match=r"row 1 .* max_prompt_tokens=2"):
        load_file(tmp_path, rows, tokenizer, max_prompt_tokens=2, too_long="error")


def test_missing_file(tmp_path: Path, tokenizer: PreTrainedTokenizerBase) -> None:
    with pytest.raises(UserError, match="data file .*missing.jsonl' does not exist"):
        load_prompt_dataset(str(tmp_path / "missing.jsonl"), "train", tokenizer=tokenizer)
    with pytest.raises(UserError, match="does not exist"):
        load_prompt_dataset("./nowhere/data", "train", tokenizer=tokenizer)


def test_unsupported_file(tmp_path: Path, tokenizer: PreTrainedTokenizerBase) -> None:
    path = tmp_path / "data.txt"
    path.write_text("hello\n")
    with pytest.raises(UserError, match="not a supported file"):
        load_prompt_dataset(str(path), "train", tokenizer=tokenizer)


def test_malformed_file(tmp_path: Path, tokenizer: PreTrainedTokenizerBase) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "ok"}\n{not json\n')
    with pytest.raises(UserError, match="could not read data file"):
        load_prompt_dataset(str(path), "train", tokenizer=tokenizer)


def test_missing_prompt_column(tmp_path: Path, tokenizer: PreTrainedTokenizerBase) -> None:
    rows = [{"question": "Q", "answer": "A"}]
    with pytest.raises(UserError, match=r"no prompt column 'prompt' \(columns: question, answer\)"):
        load_file(tmp_path, rows, tokenizer)
    with pytest.raises(UserError, match="data.prompt_column="):
        load_file(tmp_path, rows, tokenizer)


def test_prompt_column_clash(tmp_path: Path, tokenizer: PreTrainedTokenizerBase) -> None:
    rows = [{"prompt": "P", "question": "Q"}]
    with pytest.raises(UserError, match="both 'prompt' and 'question'"):
        load_file(tmp_path, rows, tokenizer, prompt_column="question")
    with pytest.raises(UserError, match="column 'prompt_ids', which rlhf-pg computes"):
        load_file(tmp_path, [{"prompt": "P", "prompt_ids": [1]}], tokenizer)


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_empty_dataset(suffix: str, tmp_path: Path, tokenizer: PreTrainedTokenizerBase) -> None:
    path = tmp_path / f"empty{suffix}"
    if suffix == ".parquet":
        pd.DataFrame({"prompt": pd.Series([], dtype=str)}).to_parquet(path)
    else:
        path.write_text("prompt,answer\n" if suffix == ".csv" else "")
    with pytest.raises(UserError, match="has no rows"):
        load_prompt_dataset(str(path), "train", tokenizer=tokenizer)


def test_bad_rows(tmp_path: Path, tokenizer: PreTrainedTokenizerBase) -> None:
    with pytest.raises(UserError, match="prompt in row 1 is empty"):
        load_file(tmp_path, [{"prompt": "a"}, {"prompt": ""}], tokenizer)
    with pytest.raises(UserError, match="row 0 is neither a string nor"):
        load_file(tmp_path, [{"prompt": 3}], tokenizer)
    with pytest.raises(UserError, match="row 0 is neither a string nor"):
        load_file(tmp_path, [{"prompt": []}], tokenizer)


def test_chat_template_failure_names_the_row(tmp_path: Path, tokenizer: PreTrainedTokenizerBase) -> None:
    broken = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    broken.chat_template = "{{ raise_exception('no ' + messages[0]['role']) if messages|length > 1 }}"
    rows = [
        {"prompt": [{"role": "user", "content": "fine"}]},
        {"prompt": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
    ]
    with pytest.raises(UserError, match=r"chat template failed on the prompt in row 1 \(.*no user"):
        load_file(tmp_path, rows, broken)
    broken.chat_template = None
    with pytest.raises(UserError, match="row 0"):
        load_file(tmp_path, rows, broken)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"too_long": "drop"}, "too_long='drop' is invalid"),
        ({"max_prompt_tokens": 0}, "max_prompt_tokens=0 is invalid"),
        ({"limit": 0}, "limit=0 is invalid"),
    ],
)
def test_invalid_options(kwargs: dict[str, Any], message: str, tokenizer: PreTrainedTokenizerBase) -> None:
    with pytest.raises(UserError, match=message):
        load_prompt_dataset("arithmetic", "train", tokenizer=tokenizer, **kwargs)


def test_hub_dataset_offline(tokenizer: PreTrainedTokenizerBase) -> None:
    with pytest.raises(UserError, match=r"could not be downloaded \(offline\?\): use a local"):
        load_prompt_dataset("no-such-org/no-such-dataset", "train", tokenizer=tokenizer)


def _dataset_folder(root: Path) -> Path:
    """A dataset laid out as a hub repo (two configurations, train/test splits), as a clone of one is."""
    card = (
        "---\nconfigs:\n"
        "- config_name: easy\n  data_files:\n  - {split: train, path: easy/train.jsonl}\n"
        "  - {split: test, path: easy/test.jsonl}\n"
        "- config_name: hard\n  data_files:\n  - {split: train, path: hard/train.jsonl}\n"
        "  - {split: test, path: hard/test.jsonl}\n---\n"
    )
    root.mkdir()
    (root / "README.md").write_text(card)
    for config in ("easy", "hard"):
        (root / config).mkdir()
        for split, n in (("train", 3), ("test", 2)):
            rows = [{"prompt": f"{config} {split} {i}", "answer": str(i)} for i in range(n)]
            (root / config / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_dataset_configuration_and_split(tmp_path: Path, tokenizer: PreTrainedTokenizerBase) -> None:
    """A hub-style dataset with configurations: the chosen configuration and split load."""
    folder = _dataset_folder(tmp_path / "ds")
    hard = load_prompt_dataset(str(folder), "test", tokenizer=tokenizer, config="hard")
    assert hard["prompt"] == ["hard test 0", "hard test 1"] and hard["answer"] == ["0", "1"]
    easy = load_prompt_dataset(str(folder), "train", tokenizer=tokenizer, config="easy")
    assert easy["prompt"] == ["easy train 0", "easy train 1", "easy train 2"]
    with pytest.raises(UserError, match="configuration 'medium'.*data.train_config"):
        load_prompt_dataset(str(folder), "train", tokenizer=tokenizer, config="medium")


def test_recipe_dataset_configuration(tmp_path: Path, tiny_config) -> None:
    from rlhf_pg.models import load_tokenizer
    from rlhf_pg.setup import build_datasets

    folder = _dataset_folder(tmp_path / "ds")
    cfg = tiny_config(tmp_path, data={"train": str(folder), "train_config": "hard", "eval_split": "test"})
    train, held_out = build_datasets(cfg, load_tokenizer("tiny-random-llama"))
    assert train["prompt"][0] == "hard train 0" and held_out["prompt"][0] == "hard test 0"  # eval follows train
