"""Prompt datasets: built-in procedural tasks, local files and hub datasets.

:func:`load_prompt_dataset` returns a :class:`datasets.Dataset` with

* ``prompt`` — the original prompt: a string (standard form) or a list of ``{"role", "content"}``
  messages (conversational form);
* ``prompt_text`` — the text the model sees (the chat template applied for conversational
  prompts, with a generation prompt);
* ``prompt_ids`` — ``prompt_text`` tokenized without special tokens;
* every other column of the source unchanged (e.g. ``answer`` for a reward function).
"""

from __future__ import annotations

import contextlib
import hashlib
import operator
import random
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, get_args

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
from transformers import PreTrainedTokenizerBase

from rlhf_pg.config import TooLong
from rlhf_pg.errors import UserError, one_line
from rlhf_pg.paths import looks_like_path

PROMPT = "prompt"
PROMPT_TEXT = "prompt_text"
PROMPT_IDS = "prompt_ids"

FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
"""Local file suffix → ``datasets`` packaged builder."""


ARITHMETIC_TEMPLATE = "What is {a} {op} {b}? Answer with just the number."
"""User message of the ``arithmetic`` task."""

_ARITHMETIC_OPS: dict[str, Callable[[int, int], int]] = {
    "+": operator.add,
    "-": operator.sub,
    "*": operator.mul,
}
_TEST_BUCKETS = 5
"""One question in this many (by a seeded hash of the question) belongs to the test split."""
_MAX_DRAWS_PER_ROW = 50
_MAX_EXTRA_DRAWS = 10_000
"""Bound on random draws when sampling distinct test questions from a small question space."""
_SPLIT_ALIASES = {"train": "train", "test": "test", "eval": "test", "validation": "test"}


def make_arithmetic(
    split: str,
    n: int,
    seed: int = 0,
    max_operand: int = 20,
    ops: str = "+-*",
    template: str = ARITHMETIC_TEMPLATE,
) -> datasets.Dataset:
    """Generate ``n`` arithmetic questions ``a op b`` with operands in ``[0, max_operand]``.

    Rows have a conversational ``prompt`` (one user message: ``template`` formatted with ``a``,
    ``op`` and ``b``) and the ``answer`` as a string.
    Every possible question is assigned to train or test by a seeded hash, so the splits never
    share a question whatever their sizes. Test questions are distinct; train questions are drawn
    with replacement (the train part of the question space may be smaller than ``n``).
    ``split`` is ``"train"`` or ``"test"`` (``"eval"`` and ``"validation"`` mean test).
    """
    split = _task_split("arithmetic", split)
    if n < 1:
        raise UserError(f"arithmetic needs at least 1 {split} question, got n={n}: raise it")
    if max_operand < 1:
        raise UserError(f"arithmetic max_operand must be >= 1, got {max_operand}: raise it")
    try:
        template.format(a=1, op="+", b=2)
    except (KeyError, IndexError, ValueError) as err:
        raise UserError(
            f"arithmetic template {template!r} is invalid ({err!r}): use only the fields {{a}}, {{op}} and {{b}}"
        ) from None
    if not ops or any(op not in _ARITHMETIC_OPS for op in ops):
        raise UserError(f"arithmetic ops '{ops}' is invalid: use a non-empty string of {''.join(_ARITHMETIC_OPS)}")
    operators = sorted(set(ops), key=ops.index)
    rng = random.Random(f"arithmetic-{split}-{seed}")
    prompts: list[list[dict[str, str]]] = []
    answers: list[str] = []
    seen: set[str] = set()
    draws_left = _MAX_DRAWS_PER_ROW * n + _MAX_EXTRA_DRAWS
    while len(prompts) < n:
        if draws_left == 0:
            raise UserError(
                f"arithmetic with max_operand={max_operand} and ops '{ops}' has too few distinct "
                f"test questions for n={n} (found {len(seen)}): lower n_eval or raise max_operand"
            )
        draws_left -= 1
        a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
        op = rng.choice(operators)
        expression = f"{a} {op} {b}"
        if _is_test_question(expression, seed) != (split == "test"):
            continue
        if split == "test":
            if expression in seen:
                continue
            seen.add(expression)
        prompts.append([{"role": "user", "content": template.format(a=a, op=op, b=b)}])
        answers.append(str(_ARITHMETIC_OPS[op](a, b)))
    return datasets.Dataset.from_dict({PROMPT: prompts, "answer": answers})


def _arithmetic_task(
    split: str,
    *,
    seed: int = 0,
    n_train: int = 5000,
    n_eval: int = 200,
    max_operand: int = 20,
    ops: str = "+-*",
    template: str = ARITHMETIC_TEMPLATE,
) -> datasets.Dataset:
    """The ``arithmetic`` task: ``n_train`` train or ``n_eval`` test questions."""
    n = n_train if _task_split("arithmetic", split) == "train" else n_eval
    return make_arithmetic(split, n, seed=seed, max_operand=max_operand, ops=ops, template=template)


TASKS: dict[str, Callable[..., datasets.Dataset]] = {"arithmetic": _arithmetic_task}
"""Built-in tasks: name → ``builder(split, *, seed, **task_kwargs) -> Dataset``."""


def load_prompt_dataset(
    source: str,
    split: str,
    *,
    tokenizer: PreTrainedTokenizerBase,
    prompt_column: str = PROMPT,
    system_prompt: str | None = None,
    max_prompt_tokens: int | None = None,
    too_long: TooLong = "truncate",
    task_kwargs: dict[str, Any] | None = None,
    limit: int | None = None,
    seed: int = 0,
    config: str | None = None,
) -> datasets.Dataset:
    """Load prompts from a built-in task, a local file or a hub dataset and tokenize them.

    Args:
        source: a name in :data:`TASKS`, a ``.jsonl``/``.json``/``.csv``/``.parquet`` file (a
            single file is the whole dataset for any ``split``), or a hub dataset name.
        split: split to load (``train``/``test`` for tasks; ``eval``/``validation`` mean test).
        tokenizer: tokenizer whose chat template renders conversational prompts.
        prompt_column: column holding the prompts; renamed to ``prompt`` in the result.
        system_prompt: prepended as a system message to conversational prompts that have none;
            string prompts are used as they are.
        max_prompt_tokens: longest allowed prompt in tokens, ``None`` for no limit.
        too_long: ``"truncate"`` keeps the last ``max_prompt_tokens`` tokens (with one warning
            giving the count); ``"error"`` raises :class:`UserError`.
        task_kwargs: keyword arguments of a built-in task (e.g. ``n_train``, ``max_operand``);
            ignored for other sources, so one set can serve a task train source and a file eval.
        limit: keep only the first ``limit`` rows.
        seed: seed of a built-in task, unless ``task_kwargs`` sets ``seed``.

    Returns:
        The dataset with ``prompt``, ``prompt_text``, ``prompt_ids`` and the other source columns.
    """
    if too_long not in get_args(TooLong):
        raise UserError(f"too_long='{too_long}' is invalid: use one of {', '.join(get_args(TooLong))}")
    if max_prompt_tokens is not None and max_prompt_tokens < 1:
        raise UserError(f"max_prompt_tokens={max_prompt_tokens} is invalid: use a positive number or none")
    if limit is not None and limit < 1:
        raise UserError(f"data limit={limit} is invalid: use a positive number of rows or none")

    raw = _load_raw(source, split, task_kwargs or {}, seed, config)
    if len(raw) == 0:
        raise UserError(f"dataset '{source}' (split '{split}') has no rows: use a dataset with prompts")
    raw = _with_prompt_column(raw, source, prompt_column)
    if limit is not None and limit < len(raw):
        raw = raw.select(range(limit))

    texts = [render_prompt(prompt, index, tokenizer, system_prompt) for index, prompt in enumerate(raw[PROMPT])]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    if max_prompt_tokens is not None:
        texts, ids = _enforce_length(texts, ids, tokenizer, max_prompt_tokens, too_long, source)

    others = [column for column in raw.column_names if column != PROMPT]
    out = raw.add_column(PROMPT_TEXT, texts).add_column(PROMPT_IDS, ids)
    return out.select_columns([PROMPT, PROMPT_TEXT, PROMPT_IDS, *others])


def _task_split(task: str, split: str) -> str:
    """Normalise a task split name to ``train`` or ``test``."""
    try:
        return _SPLIT_ALIASES[split]
    except KeyError:
        raise UserError(f"task '{task}' has no split '{split}': use one of {', '.join(_SPLIT_ALIASES)}") from None


def _is_test_question(expression: str, seed: int) -> bool:
    """Whether ``expression`` belongs to the test split (a seeded hash, stable across runs)."""
    digest = hashlib.blake2b(f"{seed}|{expression}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % _TEST_BUCKETS == 0


def _load_raw(
    source: str, split: str, task_kwargs: dict[str, Any], seed: int, config: str | None = None
) -> datasets.Dataset:
    """Load the source's rows as they are (``task_kwargs`` only reach built-in tasks; ``config``, a dataset
    configuration name, only hub datasets and dataset folders)."""
    if source in TASKS:
        kwargs = {"seed": seed, **task_kwargs}
        try:
            return TASKS[source](split, **kwargs)
        except TypeError as err:
            raise UserError(f"invalid task_kwargs for task '{source}' ({err}): use only the task's options") from err
    path = Path(source).expanduser()
    if path.is_dir():  # a dataset folder laid out as a hub repo (data files, README configs)
        return _load_hub(str(path), split, config)
    if path.suffix.lower() in FILE_BUILDERS or path.exists() or looks_like_path(source):
        return _load_file(path)
    return _load_hub(source, split, config)


def _load_file(path: Path) -> datasets.Dataset:
    """Load a single local data file as one dataset."""
    if not path.exists():
        raise UserError(f"data file '{path}' does not exist: check the path given in data.train or data.eval")
    builder = FILE_BUILDERS.get(path.suffix.lower())
    if builder is None or not path.is_file():
        raise UserError(f"data source '{path}' is not a supported file: use a {'/'.join(FILE_BUILDERS)} file")
    # datasets fails on files without rows in a different obscure way per format (even with a
    # bare StopIteration for an empty .jsonl), so they are caught here first.
    if not _has_rows(path, builder):
        raise UserError(f"data file '{path}' has no rows: use a file with prompts")
    try:
        with _quiet_datasets():
            return datasets.load_dataset(builder, data_files=str(path), split="train")
    except (datasets.exceptions.DatasetsError, ValueError, OSError) as err:
        raise UserError(f"could not read data file '{path}' ({one_line(err)}): fix or re-export the file") from err


def _has_rows(path: Path, builder: str) -> bool:
    """Cheaply tell whether a data file holds at least one row (``True`` when unsure)."""
    if builder == "parquet":
        try:
            return pq.ParquetFile(path).metadata.num_rows > 0
        except (OSError, pa.ArrowException):
            return True  # not valid parquet: let datasets report the problem
    with path.open("rb") as handle:
        lines = (line.strip() for line in handle)
        first = next((line for line in lines if line), b"")
        if builder == "csv":  # the first non-blank line is the header
            return bool(next((line for line in lines if line), b""))
        return first not in (b"", b"[]")


def _load_hub(name: str, split: str, config: str | None = None) -> datasets.Dataset:
    """Load one split (of configuration ``config``) of a hub dataset or a dataset folder."""
    try:
        with _quiet_datasets():
            return datasets.load_dataset(name, config, split=split)
    except (ConnectionError, datasets.exceptions.DatasetNotFoundError) as err:
        raise UserError(
            f"dataset '{name}' is not a built-in task ({', '.join(TASKS)}) or local file and could "
            f"not be downloaded (offline?): use a local .jsonl/.json/.csv/.parquet file"
        ) from err
    except (ValueError, OSError, datasets.exceptions.DatasetsError) as err:
        raise UserError(
            f"could not load split '{split}'{f' of configuration {config!r}' if config else ''} of dataset '{name}' "
            f"({one_line(err)}): check the dataset name, data.train_config / data.eval_config and the split"
        ) from err


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """Hide the ``datasets`` progress bars for the block."""
    was_disabled = datasets.utils.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


def _with_prompt_column(raw: datasets.Dataset, source: str, prompt_column: str) -> datasets.Dataset:
    """Check the prompt column exists and rename it to ``prompt``."""
    columns = raw.column_names
    if prompt_column not in columns:
        raise UserError(
            f"dataset '{source}' has no prompt column '{prompt_column}' (columns: "
            f"{', '.join(columns)}): set data.prompt_column= to one of them"
        )
    for reserved in (PROMPT_TEXT, PROMPT_IDS):
        if reserved in columns:
            raise UserError(
                f"dataset '{source}' has a column '{reserved}', which rlhf-pg computes: rename or drop that column"
            )
    if prompt_column == PROMPT:
        return raw
    if PROMPT in columns:
        raise UserError(
            f"dataset '{source}' has both '{PROMPT}' and '{prompt_column}' columns: rename or drop "
            f"'{PROMPT}', or set data.prompt_column={PROMPT}"
        )
    return raw.rename_column(prompt_column, PROMPT)


def render_prompt(prompt: Any, index: int, tokenizer: PreTrainedTokenizerBase, system_prompt: str | None) -> str:
    """Return the text the model sees for one prompt (row ``index``)."""
    if isinstance(prompt, str):
        if not prompt:
            raise UserError(f"prompt in row {index} is empty: remove the row or fill it in")
        return prompt
    if not isinstance(prompt, list) or not prompt or not all(is_message(m) for m in prompt):
        raise UserError(
            f"prompt in row {index} is neither a string nor a non-empty list of "
            '{"role": ..., "content": ...} messages: fix that row'
        )
    messages = [{"role": m["role"], "content": m["content"]} for m in prompt]
    if system_prompt is not None and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as err:  # templates raise anything (jinja errors, ValueError without template)
        raise UserError(
            f"chat template failed on the prompt in row {index} ({one_line(err)}): fix the "
            "messages or use a tokenizer with a chat template"
        ) from err
    return str(text)


def is_message(message: Any) -> bool:
    """Whether ``message`` is a ``{"role": str, "content": str}`` mapping."""
    return (
        isinstance(message, dict) and isinstance(message.get("role"), str) and isinstance(message.get("content"), str)
    )


def _enforce_length(
    texts: list[str],
    ids: list[list[int]],
    tokenizer: PreTrainedTokenizerBase,
    max_tokens: int,
    too_long: str,
    source: str,
) -> tuple[list[str], list[list[int]]]:
    """Apply the ``too_long`` policy to prompts longer than ``max_tokens`` tokens.

    Truncation keeps the last ``max_tokens`` tokens and re-decodes ``prompt_text`` from them so the
    two columns agree.
    """
    truncated = 0
    for index, row_ids in enumerate(ids):
        if len(row_ids) <= max_tokens:
            continue
        if too_long == "error":
            raise UserError(
                f"prompt in row {index} of '{source}' has {len(row_ids)} tokens, more than "
                f"max_prompt_tokens={max_tokens}: raise the limit or set too_long=truncate"
            )
        ids[index] = row_ids[-max_tokens:]
        texts[index] = tokenizer.decode(ids[index])
        truncated += 1
    if truncated:
        warnings.warn(
            f"{truncated} of {len(ids)} prompts from '{source}' were longer than "
            f"max_prompt_tokens={max_tokens} and were left-truncated",
            stacklevel=3,
        )
    return texts, ids
