"""Rollout engine: masks stop exactly at EOS, padding never gets log-probs, log-probs match a full
forward pass, the prompt prefill is shared by the G samples, stop strings and greedy decoding work;
the one stop rule (contains_stop / stop_cut) on hand cases."""

import torch

from rlhf_pg import core
from rlhf_pg.rollout import SamplingParams, contains_stop, generate, left_pad, position_ids, stop_cut


class EosBias(torch.nn.Module):
    """Wraps a causal LM and adds ``bias`` to the EOS logit so random models stop at random times."""

    def __init__(self, model, eos_id: int, bias: float):
        super().__init__()
        self.model, self.eos_id, self.bias, self.calls = model, eos_id, bias, []

    def forward(self, **kw):
        self.calls.append(kw["input_ids"].shape)
        out = self.model(**kw)
        out.logits[..., self.eos_id] += self.bias
        return out


def _prompts(tokenizer, n=4):
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": f"What is {i} + {i * 3}?"}], tokenize=False, add_generation_prompt=True
        )
        for i in range(n)
    ]
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    ids[0] = ids[0][-7:]  # prompts of different lengths → real left padding
    return ids


def _full_forward_logprobs(model, batch, temperature=1.0):
    ids = torch.cat([batch.prompt_ids, batch.completion_ids], 1)
    attn = torch.cat([batch.prompt_mask, batch.completion_mask.long()], 1)
    T = batch.completion_ids.shape[1]
    logits = model(input_ids=ids, attention_mask=attn, position_ids=position_ids(attn), logits_to_keep=T + 1).logits
    return core.token_logprobs(logits[:, :-1], batch.completion_ids, temperature, with_entropy=False)[0]


def test_left_pad():
    ids, mask = left_pad([[1, 2, 3], [4]], pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert position_ids(mask).tolist() == [[0, 1, 2], [0, 0, 0]]


def test_masks_stop_exactly_at_eos_and_padding_has_no_logprobs(tiny_model, tokenizer):
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    model = EosBias(tiny_model, eos, bias=12.0)  # p(EOS) large but < 1: rows stop at different steps
    g = torch.Generator().manual_seed(0)
    b = generate(model, tokenizer, _prompts(tokenizer), 3, SamplingParams(max_new_tokens=12, temperature=1.0), g)
    B, T = b.completion_ids.shape
    assert B == 12
    lengths = b.completion_mask.sum(-1).long()
    assert len(set(lengths.tolist())) > 1, "want rows of different lengths for this test"
    for i in range(B):
        L = int(lengths[i])
        row = b.completion_ids[i].tolist()
        assert b.completion_mask[i, :L].eq(1).all() and b.completion_mask[i, L:].eq(0).all()
        # EOS is the last real token, and appears nowhere before it
        if L < T or row[L - 1] == eos:
            assert row[L - 1] == eos
        assert eos not in row[: L - 1]
        assert all(t == pad for t in row[L:])
        assert b.old_logprobs[i, L:].eq(0).all()
        assert b.old_logprobs[i, :L].lt(0).all()


def test_logprobs_equal_full_forward(tiny_model, tokenizer):
    model = EosBias(tiny_model, tokenizer.eos_token_id, bias=10.0)
    g = torch.Generator().manual_seed(1)
    b = generate(model, tokenizer, _prompts(tokenizer), 2, SamplingParams(max_new_tokens=10, temperature=0.7), g)
    with torch.no_grad():
        full = _full_forward_logprobs(model, b, temperature=0.7) * b.completion_mask
    torch.testing.assert_close(full, b.old_logprobs, atol=1e-4, rtol=0)


def test_prefill_once_per_prompt_and_finished_rows_dropped(tiny_model, tokenizer):
    model = EosBias(tiny_model, tokenizer.eos_token_id, bias=9.0)  # p(EOS) ≈ 0.14 per token
    prompts = _prompts(tokenizer)
    generate(model, tokenizer, prompts, 4, SamplingParams(max_new_tokens=12), torch.Generator().manual_seed(0))
    prefill, *decode = model.calls
    assert prefill[0] == len(prompts)  # 4 prompts prefilled, not 4 × G
    assert decode[0][0] > len(prompts) and all(s[1] == 1 for s in decode)  # cache shared by G rows
    assert [s[0] for s in decode] == sorted((s[0] for s in decode), reverse=True)
    assert decode[-1][0] < 16  # finished rows stopped costing compute


def test_group_rows_share_prompt_and_seed_is_reproducible(tiny_model, tokenizer):
    prompts = _prompts(tokenizer, 2)
    p = SamplingParams(max_new_tokens=6)
    b1 = generate(tiny_model, tokenizer, prompts, 3, p, torch.Generator().manual_seed(5))
    b2 = generate(tiny_model, tokenizer, prompts, 3, p, torch.Generator().manual_seed(5))
    assert torch.equal(b1.completion_ids, b2.completion_ids)
    assert torch.equal(b1.prompt_ids[0], b1.prompt_ids[2]) and not torch.equal(b1.prompt_ids[2], b1.prompt_ids[3])
    assert b1.group_size == 3


def test_greedy_matches_hf_generate(tiny_model, tokenizer):
    prompts = _prompts(tokenizer, 3)
    b = generate(tiny_model, tokenizer, prompts, 1, SamplingParams(max_new_tokens=8, temperature=0.0))
    ids, mask = left_pad(prompts, tokenizer.pad_token_id)
    ref = tiny_model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=8,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    assert torch.equal(b.completion_ids, ref[:, ids.shape[1] :][:, : b.completion_ids.shape[1]])


def test_stop_string_ends_completion(tiny_model, tokenizer):
    prompts = _prompts(tokenizer, 2)
    free = generate(tiny_model, tokenizer, prompts, 1, SamplingParams(max_new_tokens=12, temperature=0.0))
    text = tokenizer.decode(free.completion_ids[0])
    stop = text[len(text) // 2 : len(text) // 2 + 2]  # a string the greedy completion contains
    assert stop.strip()
    b = generate(tiny_model, tokenizer, prompts, 1, SamplingParams(max_new_tokens=12, temperature=0.0, stop=[stop]))
    L = int(b.completion_mask[0].sum())
    assert L < 12
    assert stop in tokenizer.decode(b.completion_ids[0, :L])
    assert stop not in tokenizer.decode(b.completion_ids[0, : L - 1])
    assert L == stop_cut(tokenizer, free.completion_lists()[0], [stop])  # the sampler applies the one stop rule


def test_stop_cut_and_contains_stop(tokenizer):
    ids = tokenizer("The answer is 42 ### and then more text", add_special_tokens=False)["input_ids"]
    text_upto = [tokenizer.decode(ids[: t + 1]) for t in range(len(ids))]
    first = next(t for t, x in enumerate(text_upto) if "###" in x)  # first token whose prefix has the stop
    assert 0 < first < len(ids) - 1
    # the length up to and including that token
    assert stop_cut(tokenizer, ids, ["###"]) == first + 1
    assert stop_cut(tokenizer, ids, ["nowhere", "###"]) == first + 1  # any of several stops
    assert stop_cut(tokenizer, ids, ["The"]) == 1  # a stop in the very first token
    # a stop spanning tokens ends at the token that completes it
    two = tokenizer("hello world", add_special_tokens=False)["input_ids"]
    assert len(two) == 2 and stop_cut(tokenizer, two, ["o w"]) == 2
    # no stop string in the text, or no stop strings at all: nothing is cut
    assert stop_cut(tokenizer, ids, ["@@@"]) == len(ids)
    assert stop_cut(tokenizer, ids, []) == len(ids)
    assert stop_cut(tokenizer, ids, [""]) == len(ids)  # empty strings are ignored, not "found everywhere"
    assert stop_cut(tokenizer, [], ["###"]) == 0
    # special tokens are removed before matching (EOS's text is not a stop hit)
    eos_text = tokenizer.decode([tokenizer.eos_token_id])
    assert eos_text and stop_cut(tokenizer, two + [tokenizer.eos_token_id], [eos_text]) == 3
    # contains_stop: per row, on the decoded text
    assert contains_stop(tokenizer, [ids[:first], ids[: first + 1], ids], ["###"]) == [False, True, True]
    assert contains_stop(tokenizer, [ids, two], []) == [False, False]
    assert contains_stop(tokenizer, [ids, two], ["", "world"]) == [False, True]
