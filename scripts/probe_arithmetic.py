"""Measure how well a model solves the built-in ``arithmetic`` task.

Used to pick the task's default wording and operand range: the base model should be neither near
0% nor above ~50% so that RL has room to improve it. Prints load times and, for each variant, the
accuracy on the first ``--n`` test questions (correct = the last number in the completion equals
the answer), overall and per operator. Decoding is greedy, or with ``--samples K`` plain sampling
at ``--temperature`` (K completions per question: the success rate RL rollouts would see).

    python scripts/probe_arithmetic.py                      # default variants on SmolLM2
    python scripts/probe_arithmetic.py --max-operand 50 --template "Compute {a} {op} {b}."
    python scripts/probe_arithmetic.py --max-operand 20 --template "..." --samples 4 --n 50
"""

from __future__ import annotations

import argparse
import re
import sys
import time

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhf_pg.data import ARITHMETIC_TEMPLATE, load_prompt_dataset
from rlhf_pg.models import SMOLLM2_ALIAS, load_model, load_tokenizer, resolve_model

_NUMBER = re.compile(r"-?\d+")
DEFAULT_VARIANTS: list[tuple[str, int]] = [
    (ARITHMETIC_TEMPLATE, 20),
    (ARITHMETIC_TEMPLATE, 50),
    ("Compute {a} {op} {b}. Reply with only the result.", 20),
    ("{a} {op} {b} =", 20),
]
"""(template, max_operand) pairs measured when no variant is given on the command line."""


def last_number(text: str) -> str | None:
    """The last integer in ``text`` (thousands separators ignored), or ``None``."""
    found = _NUMBER.findall(text.replace(",", ""))
    return found[-1] if found else None


@torch.inference_mode()
def completions(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: list[list[int]],
    args: argparse.Namespace,
) -> list[str]:
    """Decode each prompt (left-padded batches) and return the decoded completions.

    Greedy by default; with ``args.samples`` > 0 each prompt is sampled that many times (the
    completions of one prompt are adjacent in the result).
    """
    if args.samples:
        prompt_ids = [ids for ids in prompt_ids for _ in range(args.samples)]
        decoding = {"do_sample": True, "temperature": args.temperature, "top_k": 0, "top_p": 1.0}
    else:
        decoding = {"do_sample": False}
    texts: list[str] = []
    for start in range(0, len(prompt_ids), args.batch_size):
        batch = tokenizer.pad({"input_ids": prompt_ids[start : start + args.batch_size]}, return_tensors="pt")
        output = model.generate(
            **batch,
            **decoding,
            max_new_tokens=args.max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
        )
        new_tokens = output[:, batch["input_ids"].shape[1] :]
        texts.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    return texts


def evaluate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    template: str,
    max_operand: int,
    args: argparse.Namespace,
) -> tuple[float, dict[str, float], list[tuple[str, str, str]]]:
    """Overall and per-operator accuracy on the first ``args.n`` test questions of one variant."""
    dataset = load_prompt_dataset(
        "arithmetic",
        "test",
        tokenizer=tokenizer,
        task_kwargs={"max_operand": max_operand, "ops": args.ops, "template": template},
        system_prompt=args.system_prompt,
        limit=args.n,
    )
    texts = completions(model, tokenizer, dataset["prompt_ids"], args)
    repeats = args.samples or 1
    samples = [
        (row["prompt"][0]["content"], row["answer"], text)
        for row, start in zip(dataset, range(0, len(texts), repeats))
        for text in texts[start : start + repeats]
    ]
    hits = [last_number(text) == answer for _, answer, text in samples]
    per_op = {}
    for op in args.ops:
        marked = [hit for (question, _, _), hit in zip(samples, hits) if f" {op} " in question]
        if marked:
            per_op[op] = sum(marked) / len(marked)
    return sum(hits) / len(hits), per_op, samples


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, load the model and print one accuracy line per variant."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=SMOLLM2_ALIAS)
    parser.add_argument("--n", type=int, default=100, help="test questions per variant")
    parser.add_argument("--batch-size", type=int, default=25)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--ops", default="+-*")
    parser.add_argument("--template", help="measure only this wording ({a}, {op}, {b})")
    parser.add_argument("--max-operand", type=int, help="with --template: operand range")
    parser.add_argument("--system-prompt", help="system message instead of the template's default")
    parser.add_argument("--samples", type=int, default=0, help="sample K completions per question")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--show", type=int, default=5, help="sample completions to print")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    resolve_model(args.model)
    print(f"resolve {args.model}: {time.perf_counter() - start:.1f}s")
    start = time.perf_counter()
    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model).eval()
    print(f"load tokenizer + model: {time.perf_counter() - start:.1f}s")

    variants = [(args.template, args.max_operand or 20)] if args.template else DEFAULT_VARIANTS
    mode = f"sampled x{args.samples} at T={args.temperature}" if args.samples else "greedy"
    for template, max_operand in variants:
        start = time.perf_counter()
        acc, per_op, samples = evaluate(model, tokenizer, template, max_operand, args)
        elapsed = time.perf_counter() - start
        ops = " ".join(f"{op}:{value:.0%}" for op, value in per_op.items())
        print(f"{acc:6.1%} ({ops}) {mode} max_operand={max_operand} {template!r} ({elapsed:.0f}s)")
        for question, answer, text in samples[: args.show]:
            print(f"        {question!r} -> {text!r} (answer {answer})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
