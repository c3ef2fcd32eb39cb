"""Generation backends: the HF backend is exactly rollout.generate (and rollout.sample through it is
generate + attach_rows, inside the backend's sampling context); unknown names and a missing vllm
give one-line UserErrors; the vLLM backend's non-GPU parts (output → Batch conversion, sampling and
engine arguments, seeds, weight sync) work on fake vLLM objects."""

import sys
import types
from contextlib import contextmanager
from dataclasses import dataclass, fields
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset

from rlhf_pg import backends
from rlhf_pg.backends import (
    BACKENDS,
    VLLM_MISSING,
    HFBackend,
    VLLMBackend,
    hf_weights,
    make_backend,
    merged_adapter,
    request_seeds,
    vllm_engine_kwargs,
    vllm_logprobs_match_policy,
    vllm_outputs_to_batch,
    vllm_sampling_kwargs,
)
from rlhf_pg.batch import Batch
from rlhf_pg.errors import UserError
from rlhf_pg.rollout import SamplingParams, attach_rows, generate, sample, stop_cut

TENSORS = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "old_logprobs")


class EosBias(torch.nn.Module):
    """Adds ``bias`` to the EOS logit so the random tiny model stops at different steps."""

    def __init__(self, model, eos_id: int, bias: float):
        super().__init__()
        self.model, self.eos_id, self.bias = model, eos_id, bias

    def forward(self, **kw):
        out = self.model(**kw)
        out.logits[..., self.eos_id] += self.bias
        return out


def _prompts(tokenizer, n=3):
    ids = [tokenizer(f"Question {i}: what is {i} + {2 * i}?", add_special_tokens=False)["input_ids"] for i in range(n)]
    ids[0] = ids[0][-3:]  # different lengths → real left padding
    return ids


def _assert_same(a: Batch, b: Batch):
    assert a.group_size == b.group_size
    for f in TENSORS:
        x, y = getattr(a, f), getattr(b, f)
        assert x.dtype == y.dtype and x.shape == y.shape, f
        assert torch.equal(x, y), f


# ------------------------------------------------------------------------------------------- hf


def test_hf_backend_equals_rollout_generate(tiny_model, tokenizer, one_thread):
    model = EosBias(tiny_model, tokenizer.eos_token_id, bias=4.0)
    prompts, G = _prompts(tokenizer), 3
    params = SamplingParams(max_new_tokens=10, temperature=0.9, top_p=0.95, top_k=50)
    u = torch.rand(len(prompts) * G, params.max_new_tokens, generator=torch.Generator().manual_seed(1))
    model.train()
    with torch.no_grad():
        ref = generate(model, tokenizer, prompts, G, params, uniforms=u)
    backend = make_backend("hf", model, tokenizer)
    assert isinstance(backend, HFBackend) and backend.exact_logprobs
    got = backend.generate(prompts, G, params, uniforms=u)
    _assert_same(got, ref)
    assert len(set(got.completion_mask.sum(-1).tolist())) > 1, "want rows of different lengths"
    assert model.training, "train mode must be restored"
    # without uniforms: the same generator state gives the same samples
    with torch.no_grad():
        ref = generate(model, tokenizer, prompts, G, params, torch.Generator().manual_seed(5))
    _assert_same(backend.generate(prompts, G, params, generator=torch.Generator().manual_seed(5)), ref)
    backend.sync_weights(model)  # no-op: the backend samples from the module itself


def test_sample_through_hf_equals_generate_and_attach_rows(tiny_model, tokenizer, one_thread):
    """rollout.sample (the one sampling path) through HFBackend = rollout.generate + rollout.attach_rows
    on the same dataset rows, sampled inside the backend's sampling_context (the ``context`` factory)."""
    prompts = _prompts(tokenizer, 4)
    data = Dataset.from_dict(
        {
            "prompt": [f"q{i}" for i in range(4)],
            "prompt_ids": prompts,
            "prompt_text": tokenizer.batch_decode(prompts),
            "answer": ["1", "2", "3", "4"],
        }
    )
    params = SamplingParams(max_new_tokens=6, temperature=1.0)
    rows, G = [3, 1], 2
    u = torch.rand(len(rows) * G, 6, generator=torch.Generator().manual_seed(0))
    tiny_model.config.use_cache = False
    with torch.no_grad():  # the model's forward (decode=hf), so that a hook sees each forward in the context
        raw = generate(tiny_model, tokenizer, [prompts[r] for r in rows], G, params, uniforms=u, decode="hf")
    ref = attach_rows(raw, data.select(rows), tokenizer, G)

    forwards, events = [], []
    hook = tiny_model.register_forward_hook(lambda *_: forwards.append(1))

    @contextmanager
    def context():  # what the trainer passes (gathers sharded weights, enters autocast)
        events.append(("enter", len(forwards), torch.is_grad_enabled()))
        yield
        events.append(("exit", len(forwards)))

    try:
        backend = HFBackend(tiny_model, tokenizer, context=context, decode="hf")
        got = sample(backend, tokenizer, data, rows, G, params, uniforms=u)
    finally:
        hook.remove()
    _assert_same(got, ref)
    assert (got.prompts, got.prompt_texts, got.completions, got.columns) == (
        ref.prompts,
        ref.prompt_texts,
        ref.completions,
        ref.columns,
    )
    assert got.prompts == ["q3", "q3", "q1", "q1"] and got.columns == {"answer": ["4", "4", "2", "2"]}
    assert got.completions == tokenizer.batch_decode(got.completion_lists(), skip_special_tokens=True)
    # the factory was called once per sample() and every forward pass ran inside its context, without grad
    assert events == [("enter", 0, False), ("exit", len(forwards))] and len(forwards) > 0
    assert tiny_model.config.use_cache is False
    assert HFBackend(tiny_model, tokenizer).context is None  # no factory: sampling_context() is a no-op


# ------------------------------------------------------------------------------------- registry


def test_unknown_backend_is_a_one_line_user_error(tiny_model, tokenizer):
    with pytest.raises(UserError) as e:
        make_backend("sglang", tiny_model, tokenizer)
    msg = str(e.value)
    assert "\n" not in msg and "'sglang'" in msg
    assert all(name in msg for name in BACKENDS) and "hf, vllm" in msg
    with pytest.raises(UserError, match="backend_options"):
        make_backend("hf", tiny_model, tokenizer, gpu_memory_utilization=0.5)


def test_vllm_backend_without_vllm_is_a_one_line_user_error(tiny_model, tokenizer, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError
    for make in (lambda: VLLMBackend(tiny_model, tokenizer), lambda: make_backend("vllm", tiny_model, tokenizer)):
        with pytest.raises(UserError) as e:
            make()
        assert (
            str(e.value)
            == VLLM_MISSING
            == "rollout.backend=vllm needs the vllm package and a CUDA GPU: pip install vllm"
        )


# --------------------------------------------------------------------- vLLM outputs → Batch


def _lp(*pairs):
    """One position's log-probs as vLLM returns them: {token_id: Logprob(logprob=...)}."""
    return {tok: SimpleNamespace(logprob=v, rank=1, decoded_token="?") for tok, v in pairs}


def _completion(index, ids, logps=None, finish="stop"):
    lps = None if logps is None else [_lp((t, v)) for t, v in zip(ids, logps)]
    return SimpleNamespace(index=index, token_ids=list(ids), logprobs=lps, finish_reason=finish)


def test_vllm_conversion_cuts_pads_masks_and_places_logprobs():
    EOS, PAD = 2, 0
    prompts = [[11, 12, 13], [21]]
    lp = lambda b, t: -(b * 10 + t + 1) / 100  # noqa: E731  distinct value per (row, position)
    outs = [
        SimpleNamespace(
            prompt_token_ids=[11, 12, 13],
            outputs=[
                # listed out of order: .index decides the row
                _completion(1, [7, 8, 9, 10, 11, 12], [lp(1, t) for t in range(6)], "length"),
                _completion(0, [5, EOS, 99, 98], [lp(0, t) for t in range(4)]),  # junk after EOS is cut
            ],
        ),
        SimpleNamespace(
            prompt_token_ids=[21],
            outputs=[
                _completion(0, [EOS], [lp(2, 0)]),
                _completion(1, [4, 4, EOS], [lp(3, t) for t in range(3)]),
            ],
        ),
    ]
    b = vllm_outputs_to_batch(outs, prompts, 2, pad_id=PAD, eos_id=EOS, max_new_tokens=5)
    assert b.group_size == 2 and b.completion_ids.dtype == torch.long and b.completion_mask.dtype == torch.float32
    # rows i·G … i·G+G−1 belong to prompt i, left-padded
    assert b.prompt_ids.tolist() == [[11, 12, 13]] * 2 + [[PAD, PAD, 21]] * 2
    assert b.prompt_mask.tolist() == [[1, 1, 1]] * 2 + [[0, 0, 1]] * 2
    # T = longest kept completion (5 = max_new_tokens cut of row 1); pad id and mask 0 after the end
    assert b.completion_ids.tolist() == [
        [5, EOS, PAD, PAD, PAD],
        [7, 8, 9, 10, 11],
        [EOS, PAD, PAD, PAD, PAD],
        [4, 4, EOS, PAD, PAD],
    ]
    assert b.completion_mask.tolist() == [[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 1, 0, 0]]
    lengths = [2, 5, 1, 3]
    for row, L in enumerate(lengths):
        assert b.old_logprobs[row, :L].tolist() == pytest.approx([lp(row, t) for t in range(L)])
        assert b.old_logprobs[row, L:].eq(0).all()
    assert b.completion_lists() == [[5, EOS], [7, 8, 9, 10, 11], [EOS], [4, 4, EOS]]


def test_vllm_conversion_checks_order_and_counts():
    outs = [
        SimpleNamespace(prompt_token_ids=[2], outputs=[_completion(0, [5])]),
        SimpleNamespace(prompt_token_ids=[1], outputs=[_completion(0, [5])]),
    ]
    with pytest.raises(ValueError, match="out of order"):
        vllm_outputs_to_batch(outs, [[1], [2]], 1, pad_id=0, eos_id=2, max_new_tokens=4)
    with pytest.raises(ValueError, match="expected group_size=2"):
        vllm_outputs_to_batch(outs, [[2], [1]], 2, pad_id=0, eos_id=2, max_new_tokens=4)
    with pytest.raises(ValueError, match="lack the sampled token"):
        bad = SimpleNamespace(index=0, token_ids=[5], logprobs=[_lp((6, -1.0))])
        vllm_outputs_to_batch([SimpleNamespace(outputs=[bad])], [[1]], 1, pad_id=0, eos_id=2, max_new_tokens=4)
    # no log-probs returned → zeros; plain floats accepted
    out = SimpleNamespace(outputs=[_completion(0, [5, 6]), SimpleNamespace(index=1, token_ids=[7], logprobs=[-0.5])])
    b = vllm_outputs_to_batch([out], [[1]], 2, pad_id=0, eos_id=2, max_new_tokens=4)
    assert b.old_logprobs.tolist() == [[0.0, 0.0], [-0.5, 0.0]]


def test_vllm_conversion_stop_string_cut(tokenizer):
    ids = tokenizer("The answer is 42 ### and then more text", add_special_tokens=False)["input_ids"]
    stop = "###"
    b = vllm_outputs_to_batch(
        [SimpleNamespace(outputs=[_completion(0, ids, [-0.1] * len(ids))])],
        [[1, 2]],
        1,
        pad_id=tokenizer.pad_token_id,
        eos_id=tokenizer.eos_token_id,
        max_new_tokens=64,
        tokenizer=tokenizer,
        stop=[stop],
    )
    L = int(b.completion_mask.sum())
    assert L < len(ids)
    assert stop in tokenizer.decode(ids[:L]) and stop not in tokenizer.decode(ids[: L - 1])
    assert b.completion_ids[0].tolist() == ids[:L]
    assert L == stop_cut(tokenizer, ids, [stop])  # the one stop rule (rollout.stop_cut)


def test_vllm_conversion_reproduces_the_hf_sampler(tiny_model, tokenizer, one_thread):
    """Feed the HF sampler's own completions, with junk appended after each cut (as an engine that
    stops later might), through the conversion: it must give back the HF batch exactly."""
    model = EosBias(tiny_model, tokenizer.eos_token_id, bias=9.0)
    prompts, G = _prompts(tokenizer), 2
    u = torch.rand(len(prompts) * G, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():  # a stop string from the middle of the longest completion
        free = generate(model, tokenizer, prompts, G, SamplingParams(max_new_tokens=8, temperature=1.0), uniforms=u)
    text = max(tokenizer.batch_decode(free.completion_lists(), skip_special_tokens=True), key=len)
    params = SamplingParams(max_new_tokens=8, temperature=1.0, stop=[text[len(text) // 2 : len(text) // 2 + 3]])
    with torch.no_grad():
        hf = generate(model, tokenizer, prompts, G, params, uniforms=u)
    junk = tokenizer("junk ### tail", add_special_tokens=False)["input_ids"]
    outs = []
    for i, p in enumerate(prompts):
        comps = []
        for j in range(G):
            r = i * G + j
            ids = hf.completion_lists()[r]
            lps = hf.old_logprobs[r, : len(ids)].tolist()
            comps.append(_completion(j, ids + junk, lps + [-1.0] * len(junk)))
        outs.append(SimpleNamespace(prompt_token_ids=p, outputs=comps))
    got = vllm_outputs_to_batch(
        outs,
        prompts,
        G,
        pad_id=tokenizer.pad_token_id,
        eos_id=tokenizer.eos_token_id,
        max_new_tokens=8,
        tokenizer=tokenizer,
        stop=params.stop,
    )
    _assert_same(got, hf)
    ends = [r[-1] == tokenizer.eos_token_id for r in hf.completion_lists()]
    lengths = hf.completion_mask.sum(-1).long().tolist()
    assert any(ends), "want a row cut at EOS"
    assert any(not e and n < 8 for e, n in zip(ends, lengths)), "want a row cut by the stop string"


# ------------------------------------------------------------------ vLLM arguments and semantics


def test_vllm_sampling_and_engine_kwargs():
    kw = vllm_sampling_kwargs(
        SamplingParams(max_new_tokens=17, temperature=0.7, top_p=0.9, top_k=0, stop=["</a>"]), 4, seed=123
    )
    assert kw == dict(
        n=4,
        temperature=0.7,
        top_p=0.9,
        top_k=-1,
        max_tokens=17,
        stop=["</a>"],
        logprobs=0,
        seed=123,
        include_stop_str_in_output=True,
    )
    assert vllm_sampling_kwargs(SamplingParams(top_k=20), 2)["top_k"] == 20
    assert vllm_sampling_kwargs(SamplingParams(), 2)["stop"] is None
    e = vllm_engine_kwargs(
        "/m", supported={"model", "logprobs_mode"}, dtype="bfloat16", max_model_len=512, extra={"enforce_eager": True}
    )
    assert e == dict(
        model="/m",
        dtype="bfloat16",
        gpu_memory_utilization=0.3,
        enable_prefix_caching=True,
        seed=0,
        max_model_len=512,
        logprobs_mode="processed_logprobs",
        enforce_eager=True,
    )
    assert "logprobs_mode" not in vllm_engine_kwargs("/m", supported=None)
    assert "logprobs_mode" not in vllm_engine_kwargs("/m", supported={"model"})


def test_vllm_logprobs_semantics():
    P = SamplingParams
    for mode in ("raw_logprobs", "processed_logprobs", None):
        assert vllm_logprobs_match_policy(mode, P(temperature=1.0))
        assert vllm_logprobs_match_policy(mode, P(temperature=0.0))
        assert not vllm_logprobs_match_policy(mode, P(temperature=1.0, top_p=0.9))  # truncated or untempered
        assert not vllm_logprobs_match_policy(mode, P(temperature=1.0, top_k=5))
    assert vllm_logprobs_match_policy("processed_logprobs", P(temperature=0.7))
    assert not vllm_logprobs_match_policy("raw_logprobs", P(temperature=0.7))  # raw = τ not applied
    assert VLLMBackend.exact_logprobs is False and HFBackend.exact_logprobs is True


def test_request_seeds_are_per_prompt_and_process_invariant():
    u = torch.rand(6 * 3, 5, generator=torch.Generator().manual_seed(0))
    full = request_seeds(u, 6, 3)
    assert len(full) == 6 and len(set(full)) == 6 and all(0 <= s < 2**31 for s in full)
    assert request_seeds(u[9:], 3, 3) == full[3:]  # a process holding prompts 3..5 draws the same seeds
    assert request_seeds(None, 4, 3) == [None] * 4


# --------------------------------------------------------------------- VLLMBackend on a fake vllm


class FakeLLM:
    def __init__(self, **kwargs):
        self.kwargs, self.calls, self.loaded, self.resets, self.rpcs = kwargs, [], [], 0, []
        engine_model = SimpleNamespace(load_weights=lambda ws: self.loaded.append([(n, t.clone()) for n, t in ws]))
        self.llm_engine = SimpleNamespace(
            model_executor=SimpleNamespace(
                driver_worker=SimpleNamespace(model_runner=SimpleNamespace(model=engine_model))
            )
        )

    def generate(self, prompts, sampling_params, use_tqdm=True):
        self.calls.append((prompts, sampling_params))
        outs = []
        for p, sp in zip(prompts, sampling_params):
            ids = p["prompt_token_ids"]
            comps = [_completion(j, [ids[-1] + j, 3], [-0.25, -0.5]) for j in range(sp["n"])]
            outs.append(SimpleNamespace(prompt_token_ids=ids, outputs=comps))
        return outs

    def reset_prefix_cache(self):
        self.resets += 1

    def collective_rpc(self, method, args=()):
        self.rpcs.append((method, args))


@pytest.fixture
def fake_vllm(monkeypatch):
    mod = types.ModuleType("vllm")
    mod.LLM = FakeLLM
    mod.SamplingParams = lambda **kw: kw
    engine, arg_utils = types.ModuleType("vllm.engine"), types.ModuleType("vllm.engine.arg_utils")

    @dataclass
    class EngineArgs:
        model: str = ""
        logprobs_mode: str = "raw_logprobs"

    arg_utils.EngineArgs = EngineArgs
    assert {f.name for f in fields(EngineArgs)} == {"model", "logprobs_mode"}
    monkeypatch.setitem(sys.modules, "vllm", mod)
    monkeypatch.setitem(sys.modules, "vllm.engine", engine)
    monkeypatch.setitem(sys.modules, "vllm.engine.arg_utils", arg_utils)
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")  # restored after the test
    return mod


def test_vllm_backend_generate_on_fake_engine(fake_vllm, tiny_model, tokenizer, monkeypatch):
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING")
    be = make_backend("vllm", tiny_model, tokenizer, allow_cpu=True, dtype="bfloat16", enforce_eager=True)
    assert be.llm.kwargs == dict(
        model=tiny_model.config._name_or_path,
        dtype="bfloat16",
        gpu_memory_utilization=0.3,
        enable_prefix_caching=True,
        seed=0,
        logprobs_mode="processed_logprobs",
        enforce_eager=True,
    )
    assert be.logprobs_mode == "processed_logprobs"
    import os

    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"  # in-process engine, reachable for weight sync
    prompts, G = [[5, 6, 7], [8]], 3
    u = torch.rand(len(prompts) * G, 4, generator=torch.Generator().manual_seed(2))
    b = be.generate(prompts, G, SamplingParams(max_new_tokens=4, temperature=0.8, top_k=0), uniforms=u)
    sent, sps = be.llm.calls[0]
    assert sent == [{"prompt_token_ids": [5, 6, 7]}, {"prompt_token_ids": [8]}]
    assert [sp["seed"] for sp in sps] == request_seeds(u, 2, G)
    assert all(sp["n"] == G and sp["top_k"] == -1 and sp["logprobs"] == 0 and sp["max_tokens"] == 4 for sp in sps)
    assert b.completion_ids.tolist() == [[7, 3], [8, 3], [9, 3], [8, 3], [9, 3], [10, 3]]
    assert b.old_logprobs.tolist() == [[-0.25, -0.5]] * 6
    assert b.prompt_ids.tolist() == [[5, 6, 7]] * 3 + [[tokenizer.pad_token_id] * 2 + [8]] * 3
    be2 = VLLMBackend(tiny_model, tokenizer, allow_cpu=True, seed_from_uniforms=False)
    be2.generate(prompts, G, SamplingParams(max_new_tokens=4), uniforms=u)
    assert [sp["seed"] for sp in be2.llm.calls[0][1]] == [None, None]


def test_context_reaches_only_backends_on_the_training_module(fake_vllm, tiny_model, tokenizer):
    assert HFBackend.uses_training_module is True and VLLMBackend.uses_training_module is False
    calls = []

    @contextmanager
    def context():
        calls.append(1)
        yield

    hf = make_backend("hf", tiny_model, tokenizer, context=context)
    assert hf.context is context and calls == []  # called when sampling, not when built
    with hf.sampling_context():
        pass
    assert calls == [1]
    assert make_backend("hf", tiny_model, tokenizer).context is None
    vl = make_backend("vllm", tiny_model, tokenizer, context=context, allow_cpu=True)
    assert "context" not in vl.llm.kwargs  # not passed on to the engine as an option
    with vl.sampling_context():  # the default: nothing to enter
        pass
    assert calls == [1]


def test_vllm_backend_refuses_without_cuda(fake_vllm, tiny_model, tokenizer, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="needs the vllm package and a CUDA GPU"):
        VLLMBackend(tiny_model, tokenizer)


def test_vllm_sync_weights_in_process_and_by_rpc(fake_vllm, tiny_model, tokenizer):
    be = VLLMBackend(tiny_model, tokenizer, allow_cpu=True)
    with torch.no_grad():
        tiny_model.model.layers[0].mlp.up_proj.weight.add_(1.0)  # the trainer changed a weight
    be.sync_weights(tiny_model)
    (loaded,) = be.llm.loaded
    sd = tiny_model.state_dict()
    assert [n for n, _ in loaded] == list(sd)
    assert all(torch.equal(t, sd[n]) for n, t in loaded)
    assert be.llm.resets == 1  # prefix cache dropped: its KV was computed with the old weights
    # engine in another process: weights go through collective_rpc to a function run on each worker
    del be.llm.llm_engine
    be.sync_weights(tiny_model)
    ((fn, (weights,)),) = be.llm.rpcs
    got = []
    fn(SimpleNamespace(model_runner=SimpleNamespace(model=SimpleNamespace(load_weights=got.extend))), weights)
    assert [n for n, _ in got] == list(sd) and all(t.device.type == "cpu" for _, t in got)
    assert be.llm.resets == 2


def test_peft_weights_are_merged_under_base_names(tiny_model, one_thread):
    from peft import LoraConfig, get_peft_model

    base_names = list(tiny_model.state_dict())
    W = tiny_model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    model = get_peft_model(tiny_model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        q.lora_B["default"].weight.normal_()
    delta = (q.lora_B["default"].weight @ q.lora_A["default"].weight) * (4 / 2)
    x = torch.randint(0, 100, (1, 5))
    with torch.no_grad():
        before = model(input_ids=x).logits
    with torch.no_grad(), merged_adapter(model):
        items = dict(hf_weights(model))  # views: compare while merged (sync_weights loads them here)
        assert list(items) == base_names
        assert torch.allclose(items["model.layers.0.self_attn.q_proj.weight"], W + delta, atol=1e-6)
        assert torch.equal(
            items["model.layers.0.self_attn.k_proj.weight"],
            model.base_model.model.model.layers[0].self_attn.k_proj.weight,
        )
    with torch.no_grad():
        assert torch.allclose(model(input_ids=x).logits, before, atol=1e-5)  # unmerged again, adapter on
    assert not q.merged
    with merged_adapter(torch.nn.Linear(2, 2)) as m:  # not peft: nothing to merge
        assert isinstance(m, torch.nn.Linear)


def test_registry_is_the_documented_one():
    assert BACKENDS == {"hf": HFBackend, "vllm": VLLMBackend}
    assert backends.GenerationBackend.sync_weights(HFBackend.__new__(HFBackend), None) is None
