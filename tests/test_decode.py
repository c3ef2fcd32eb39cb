"""The lean decoding step (rlhf_pg/decode.py, ``rollout.decode``) against the model's own forward: the
same sampled tokens and log-probs bit for bit (fp32 and bf16 autocast; Llama and Qwen2 with its q/k/v
biases; left padding, G > 1, rows leaving the batch at stop strings, top-k/top-p, both random sources)
and to rounding without any padding; chunked feeding equal to one full forward; the models it refuses,
with the reason."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM

from rlhf_pg.backends import make_backend, resolve_decode
from rlhf_pg.decode import LeanDecoder, matmul_dtype, unsupported
from rlhf_pg.errors import UserError
from rlhf_pg.rollout import SamplingParams, generate, position_ids, sampling_mode

pytestmark = pytest.mark.usefixtures("one_thread")


def _prompts(tokenizer, n=3):
    ids = [tokenizer(f"Question {i}: what is {i} plus {3 * i}? Answer:")["input_ids"] for i in range(n)]
    ids[0] = ids[0][-4:]  # prompts of different lengths: real left padding
    return ids


def _qwen2(vocab: int) -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    model = Qwen2ForCausalLM(cfg)
    with torch.no_grad():  # non-zero biases, so that the bias path is exercised
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    return model


@pytest.fixture(params=["llama", "qwen2"])
def model(request, tiny_model, tokenizer):
    return tiny_model if request.param == "llama" else _qwen2(len(tokenizer))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("source", ["uniforms", "generator"])
def test_lean_decoding_samples_what_the_model_forward_samples(model, tokenizer, precision, source):
    assert unsupported(model) is None
    prompts, G, T = _prompts(tokenizer), 3, 10
    params = SamplingParams(max_new_tokens=T, temperature=0.9, top_p=0.95, top_k=50, stop=["e"])
    out = {}
    with sampling_mode(model) as m, torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        for decode in ("hf", "lean"):
            u = torch.rand(len(prompts) * G, T, generator=torch.Generator().manual_seed(3))
            g = torch.Generator().manual_seed(4)
            kw = {"uniforms": u} if source == "uniforms" else {"generator": g}
            out[decode] = generate(m, tokenizer, prompts, G, params, decode=decode, **kw)
    hf, lean = out["hf"], out["lean"]
    lengths = hf.completion_mask.sum(-1)
    assert len(set(lengths.tolist())) > 1, "want rows that leave the batch at different steps"
    assert torch.equal(hf.completion_ids, lean.completion_ids)
    assert torch.equal(hf.completion_mask, lean.completion_mask)
    assert torch.equal(hf.old_logprobs, lean.old_logprobs)  # the same arithmetic, not merely close


@pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="oneDNN has no bf16 on this CPU")
def test_prepacked_weights_sample_what_the_model_forward_samples(model, tokenizer, monkeypatch):
    """bf16 with every weight prepacked in oneDNN's layout (as on CPUs with AMX; forced here, whatever the
    CPU) in the decoding steps: the same tokens and log-probs as the model's forward, bit for bit, with one
    thread; every product of a decoding step used them, the prefill none."""
    from rlhf_pg import decode

    monkeypatch.setattr(decode, "prepacks_weights", lambda device, dtype: dtype == torch.bfloat16)
    used = []
    packed_linear = decode.packed_linear
    monkeypatch.setattr(decode, "packed_linear", lambda *a: used.append(a[0].shape) or packed_linear(*a))
    prompts, G, T = _prompts(tokenizer), 3, 10
    params = SamplingParams(max_new_tokens=T, temperature=0.9, top_p=0.95, stop=["e"])
    u = torch.rand(len(prompts) * G, T, generator=torch.Generator().manual_seed(3))
    with sampling_mode(model) as m, torch.autocast("cpu", dtype=torch.bfloat16):
        hf, lean = (generate(m, tokenizer, prompts, G, params, uniforms=u, decode=d) for d in ("hf", "lean"))
    per_step = 7 * model.config.num_hidden_layers + 1  # every product of a decoding step, the LM head's too
    assert used and len(used) % per_step == 0
    assert all(len(shape) == 2 or shape[1] == 1 for shape in used)  # (rows, 1 column, d); the head (rows, d)
    assert torch.equal(hf.completion_ids, lean.completion_ids)
    assert torch.equal(hf.old_logprobs, lean.old_logprobs)


def test_without_padding_it_samples_the_same_tokens_to_rounding(model, tokenizer):
    """No padding anywhere: transformers then runs one-query attention with SDPA's enable_gqa kernel
    (3-4x slower on the CPU than grouping the query heads, which the lean step keeps): the same tokens,
    log-probs equal to float rounding instead of bit for bit."""
    prompts = [tokenizer(f"Question {i}: what is {i} plus {i}?")["input_ids"] for i in range(3)]
    assert len({len(p) for p in prompts}) == 1
    params = SamplingParams(max_new_tokens=8)
    u = torch.rand(6, 8, generator=torch.Generator().manual_seed(0))
    with sampling_mode(model) as m:
        hf, lean = (generate(m, tokenizer, prompts, 2, params, uniforms=u, decode=d) for d in ("hf", "lean"))
    assert torch.equal(hf.completion_ids, lean.completion_ids)
    torch.testing.assert_close(hf.old_logprobs, lean.old_logprobs, atol=1e-5, rtol=0)


def test_feeding_in_chunks_equals_one_forward(model, tokenizer):
    ids = torch.tensor([tokenizer("one two three four five six seven eight")["input_ids"]] * 2)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # row 1 left-padded by 3
    pos = position_ids(mask)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        dec = LeanDecoder(model, matmul_dtype(model))
        dec.start(2, ids.shape[1] + 4, ids.device)
        first = dec.feed(ids[:, :5], mask[:, :5], pos[:, :5], last_only=False)
        rest = dec.feed(ids[:, 5:], mask[:, 5:], pos[:, 5:], last_only=False)
    got = torch.cat([first, rest], 1)
    real = mask.bool()
    torch.testing.assert_close(got[real], ref[real], atol=1e-5, rtol=1e-5)


def test_models_it_does_not_cover_are_named_with_the_reason(tiny_model, tokenizer):
    from peft import LoraConfig, get_peft_model

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=100))
    assert "GPT2LMHeadModel" in unsupported(gpt2)
    assert resolve_decode("auto", gpt2) == "hf"
    assert resolve_decode("hf", tiny_model) == "hf"
    assert resolve_decode("auto", tiny_model) == "lean"
    with pytest.raises(
        UserError,
        match=r"rollout.decode=lean cannot decode this model: GPT2LMHeadModel .* use rollout.decode=auto or hf",
    ):
        resolve_decode("lean", gpt2)
    assert make_backend("hf", tiny_model, tokenizer).decode == "lean"
    with pytest.raises(UserError, match="rollout.decode=lean applies to rollout.backend=hf only"):
        make_backend("vllm", gpt2, tokenizer, decode="lean")
    lora = get_peft_model(tiny_model, LoraConfig(r=2, target_modules=["q_proj"])).get_base_model()  # in place
    assert "q_proj is a peft.tuners.lora.layer.Linear, not a torch.nn.Linear (adapters" in unsupported(lora)


def test_a_model_running_another_attention_kernel_is_decoded_by_its_forward(tiny_model):
    tiny_model.set_attn_implementation("eager")
    assert "'eager' attention" in unsupported(tiny_model)
    assert resolve_decode("auto", tiny_model) == "hf"
