"""Tests for rlhf_pg.paths.looks_like_path, the path-or-hub-id rule of models and datasets."""

from __future__ import annotations

import pytest

from rlhf_pg.data import FILE_BUILDERS
from rlhf_pg.paths import PATH_SUFFIXES, looks_like_path


@pytest.mark.parametrize(
    "name",
    [
        "./x",
        "../x",
        ".",
        "/abs",
        "/abs/model",
        "~/x",
        "~",
        "data/file.jsonl",
        "train.JSONL",
        "data/rows.csv",
        "weights/model.safetensors",
        "runs/a/b",
        "runs/exp/final",
        "C:\\models\\m",
        "dir\\file",
    ],
)
def test_paths(name: str) -> None:
    assert looks_like_path(name)


@pytest.mark.parametrize(
    "name",
    [
        "org/name",
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        "Qwen/Qwen2.5-0.5B",
        "microsoft/phi-1.5",
        "openai/gsm8k",
        "gpt2",
        "arithmetic",
        "tiny-random-llama",
        "",
    ],
)
def test_hub_ids_and_names(name: str) -> None:
    assert not looks_like_path(name)


def test_every_data_file_suffix_marks_a_path() -> None:
    assert set(FILE_BUILDERS) <= set(PATH_SUFFIXES)
    for suffix in FILE_BUILDERS:
        assert looks_like_path(f"org/data{suffix}")
