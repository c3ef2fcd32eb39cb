"""An in-process double of the parts of vLLM that rlhf-pg uses, so the trainer's vLLM branches run in CI on CPU.

:func:`install` puts a fake ``vllm`` package into ``sys.modules`` (with ``vllm.engine.arg_utils.EngineArgs``,
``vllm.outputs``, ``vllm.logprobs``/``vllm.sequence``, ``vllm.inputs``) whose :class:`LLM` is a small but real
engine: it loads ITS OWN copy of the Hugging Face checkpoint (``AutoModelForCausalLM.from_pretrained(model)``, a
separate set of weights in the engine's dtype), samples autoregressively with a KV cache, keeps a prefix cache,
and answers with objects shaped like vLLM's ``RequestOutput`` / ``CompletionOutput`` / ``Logprob``.

What it follows from vLLM (V1 engine, ≥ 0.10.1):

* ``LLM(**kwargs)`` builds ``EngineArgs(**kwargs)`` first, so an unknown engine argument is a ``TypeError``, as in
  vLLM. ``dtype="auto"`` takes the checkpoint's dtype, except that a float32 checkpoint runs in bfloat16 (vLLM
  downcasts float32 models under "auto"); pass ``dtype="float32"`` for an engine that can match the trainer exactly.
* ``SamplingParams`` is a dataclass of vLLM's field names: unknown keywords are a ``TypeError``; invalid values a
  ``ValueError``; features the double does not implement (penalties, min_p, prompt_logprobs, …) raise
  ``NotImplementedError`` instead of being ignored. ``top_k`` −1 or 0 = off.
* Sampling, per request: logits in float32 (+ the mismatch knob), temperature, then top-k, then top-p (vLLM's
  rule: drop the smallest tokens while their cumulative mass ≤ 1 − p), then vLLM's exponential-race draw
  ``argmax(p / q)``, ``q ~ Exp(1)``, from a ``torch.Generator`` seeded with the request's ``seed`` (sample j of a
  request with ``n`` samples uses ``seed + j``, as vLLM's child requests do; unseeded requests share the engine's
  generator, seeded with ``LLM(seed=...)``). ``temperature < 1e-5`` is greedy.
* Returned log-probs follow ``logprobs_mode``: ``raw_logprobs`` (the V1 default: log softmax of the raw logits),
  ``processed_logprobs`` (what rlhf-pg asks for: the log-probs of the distribution actually sampled from —
  tempered AND top-k/top-p-truncated and renormalised, as rlhf_pg.backends documents), ``raw_logits``,
  ``processed_logits``. With ``SamplingParams(logprobs=k)`` each position holds the top-k entries plus the sampled
  token as ``{token_id: Logprob(logprob, rank, decoded_token)}``; ``logprobs=None`` → ``.logprobs`` is None.
* Stops: EOS (the tokenizer's and the generation_config's ids, unless ``ignore_eos``; the EOS token is in
  ``token_ids`` but not in ``text``), ``stop_token_ids``, stop strings (found in the detokenized text; the token
  completing it is the last one; ``text`` cut before or after it per ``include_stop_str_in_output``),
  ``max_tokens`` and ``max_model_len`` → ``finish_reason`` "stop"/"length", ``stop_reason`` None / the stop
  string / the stop token id.
* With ``n > 1`` the ``CompletionOutput`` objects come in the order they finished (shortest first), each with its
  ``.index``, as V1 may return them — consumers must sort by ``index``.
* Prefix cache (``enable_prefix_caching``, on by default as in V1): the KV of every prompt and finished
  sequence is kept in blocks of ``block_size`` (16) tokens; a request reuses its longest cached prefix (whole
  blocks, never its last prompt token) and reports it as ``RequestOutput.num_cached_tokens``. Entries are NOT
  invalidated by ``load_weights`` — exactly as in vLLM, where new weights with a stale prefix cache give stale
  KV — only ``reset_prefix_cache()`` drops them.
* Weights: with ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` the engine is in this process and its model is reachable as
  ``llm.llm_engine.model_executor.driver_worker.worker.model_runner.model`` (the wrapper also forwards attribute
  access to the worker, so ``driver_worker.model_runner.model`` works too, as vLLM's WorkerWrapperBase does);
  ``model.load_weights(iterable of (HF checkpoint name, tensor))`` copies into the engine's own parameters
  (cast to its dtype), skips ``lm_head.weight`` of a tied model and ``rotary_emb.inv_freq``, raises on unknown
  names and shape mismatches, and returns the set of loaded names. Otherwise (engine "in another process")
  ``llm_engine`` has no ``model_executor`` and only ``collective_rpc(method, args=..., kwargs=...)`` reaches
  the worker; a callable needs ``VLLM_ALLOW_INSECURE_SERIALIZATION=1`` and tensors arrive as copies.

Differences from real vLLM (on purpose or out of scope): no continuous batching, scheduler, CUDA graphs or
paged attention (one request at a time, a Hugging Face ``DynamicCache``; the prefix cache is a list of
sequences, unbounded but for an LRU cap); no tensor parallelism, LoRA requests, penalties, beam search,
prompt log-probs, sleep/wake_up (rlhf-pg does not call them); string prompts are tokenized with the model's
tokenizer; the "kernels" are the same PyTorch ops the trainer uses, so without a mismatch knob an fp32 engine
reproduces the trainer's log-probs to ~1e-6.

The mismatch knob (:class:`Settings`): ``logit_noise`` = σ adds a fixed per-vocabulary perturbation
σ·N(0, 1) to the engine's logits, so it samples from (and reports log-probs of) a slightly different policy
than the trainer's, and π_old/μ ≠ 1. An engine ``dtype="bfloat16"`` against an fp32 trainer is the other,
natural mismatch.

Test hooks: ``mod.engines`` (every LLM built), ``llm.events`` (("load_weights", n), ("reset_prefix_cache",),
("generate", n_requests), ("collective_rpc", name) in call order), ``llm.requests`` ((prompt ids,
SamplingParams) per request), ``llm.outputs`` (the RequestOutput lists returned), ``llm.loaded`` (names loaded
per load_weights call), ``llm.model`` (the engine's HF model).
"""

from __future__ import annotations

import copy
import itertools
import os
import sys
import types
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

VERSION = "0.10.2+cpu-double"
LOGPROBS_MODES = ("raw_logprobs", "raw_logits", "processed_logprobs", "processed_logits")
_SAMPLING_EPS = 1e-5  # vLLM: temperature below this is greedy
_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "half": torch.float16,
}


@dataclass
class Settings:
    """Test knobs of the engines built after they are set (not vLLM options)."""

    logit_noise: float = 0.0
    """σ of a fixed per-vocabulary logit perturbation: the engine samples from a slightly different policy."""
    in_process: bool | None = None
    """None: from VLLM_ENABLE_V1_MULTIPROCESSING ("0" = in process, as rlhf-pg sets it); False: the engine's
    model is reachable only through collective_rpc."""
    max_prefix_entries: int = 512
    """LRU cap of the prefix cache."""


# ----------------------------------------------------------------------------------------- outputs


@dataclass
class Logprob:
    """vllm.logprobs.Logprob (vllm.sequence.Logprob in older versions)."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    lora_request: Any = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: Any
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    metrics: Any = None
    lora_request: Any = None


# ------------------------------------------------------------------------------------ parameters


@dataclass
class SamplingParams:
    """vllm.SamplingParams: vLLM's field names and defaults; unknown keywords are a TypeError."""

    n: int = 1
    best_of: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    detokenize: bool = True
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    logits_processors: Any = None
    include_stop_str_in_output: bool = False
    truncate_prompt_tokens: int | None = None
    output_kind: Any = None

    def __post_init__(self) -> None:
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        else:
            self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids or [])
        if not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"n must be at least 1, got {self.n}.")
        if self.temperature < 0.0:
            raise ValueError(f"temperature must be non-negative, got {self.temperature}.")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}.")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise ValueError(f"top_k must be -1 (disable), or at least 1, got {self.top_k}.")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}.")
        if self.logprobs is not None and self.logprobs < 0:
            raise ValueError(f"logprobs must be non-negative, got {self.logprobs}.")
        if self.seed is not None and not isinstance(self.seed, int):
            raise ValueError(f"seed must be an int, got {type(self.seed).__name__}.")
        if any(not s for s in self.stop):
            raise ValueError("stop cannot contain an empty string.")
        unsupported = {
            "best_of": self.best_of not in (None, self.n),
            "presence_penalty": self.presence_penalty != 0.0,
            "frequency_penalty": self.frequency_penalty != 0.0,
            "repetition_penalty": self.repetition_penalty != 1.0,
            "min_p": self.min_p != 0.0,
            "bad_words": bool(self.bad_words),
            "prompt_logprobs": self.prompt_logprobs is not None,
            "logits_processors": bool(self.logits_processors),
            "truncate_prompt_tokens": self.truncate_prompt_tokens is not None,
            "detokenize": not self.detokenize,
        }
        used = [k for k, v in unsupported.items() if v]
        if used:
            raise NotImplementedError(f"the vLLM double does not implement SamplingParams {', '.join(used)}")


@dataclass
class EngineArgs:
    """vllm.engine.arg_utils.EngineArgs (the fields the double knows; LLM(**kw) → EngineArgs(**kw))."""

    model: str = "facebook/opt-125m"
    tokenizer: str | None = None
    trust_remote_code: bool = False
    revision: str | None = None
    dtype: str = "auto"
    seed: int | None = 0
    max_model_len: int | None = None
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool | None = None
    block_size: int | None = None
    max_num_seqs: int | None = None
    max_logprobs: int = 20
    logprobs_mode: str = "raw_logprobs"
    enforce_eager: bool = False
    tensor_parallel_size: int = 1
    distributed_executor_backend: str | None = None
    enable_sleep_mode: bool = False
    generation_config: str = "auto"

    def __post_init__(self) -> None:
        if self.logprobs_mode not in LOGPROBS_MODES:
            raise ValueError(f"logprobs_mode must be one of {LOGPROBS_MODES}, got {self.logprobs_mode!r}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.dtype != "auto" and self.dtype not in _DTYPES:
            raise ValueError(f"Unknown dtype: {self.dtype}")
        if self.tensor_parallel_size != 1:
            raise NotImplementedError("the vLLM double runs one worker (tensor_parallel_size=1)")


# ---------------------------------------------------------------------------------------- engine


class EngineModel:
    """What ``model_runner.model`` is in vLLM: the engine's own torch model with ``load_weights``."""

    def __init__(self, hf_model: torch.nn.Module, engine: LLM):
        self.hf_model, self.engine = hf_model, engine
        self.tied = bool(getattr(hf_model.config, "tie_word_embeddings", False))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        params = dict(self.hf_model.named_parameters())
        loaded: list[str] = []
        with torch.no_grad():
            for name, tensor in weights:
                if "rotary_emb.inv_freq" in name:
                    continue
                if self.tied and name.startswith("lm_head."):
                    continue  # vLLM skips it: tied to embed_tokens
                if name not in params:
                    raise ValueError(
                        f"There is no module or parameter named '{name}' in {type(self.hf_model).__name__}"
                    )
                p = params[name]
                if tuple(p.shape) != tuple(tensor.shape):
                    raise AssertionError(
                        f"Attempted to load weight ({tuple(tensor.shape)}) into parameter ({tuple(p.shape)}) {name}"
                    )
                p.copy_(tensor.to(device=p.device))  # cast to the engine's dtype, no aliasing
                loaded.append(name)
        self.engine.loaded.append(loaded)
        self.engine.events.append(("load_weights", len(loaded)))
        return set(loaded)


class Worker:
    def __init__(self, model: EngineModel):
        self.model_runner = types.SimpleNamespace(model=model)


class WorkerWrapper:
    """vLLM's WorkerWrapperBase: holds ``.worker`` and forwards other attributes to it."""

    def __init__(self, worker: Worker):
        self.worker = worker

    def __getattr__(self, attr: str):
        return getattr(self.__dict__["worker"], attr)


@dataclass
class _PrefixEntry:
    tokens: tuple[int, ...]
    cache: Any  # a batch-1 DynamicCache over all of ``tokens``


class LLM:
    """vllm.LLM on CPU: its own copy of the model, prefix cache, vLLM-shaped outputs (see module docstring)."""

    def __init__(self, model: str, **kwargs: Any):
        from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

        self.args = EngineArgs(model=model, **kwargs)  # unknown arguments: TypeError, as in vLLM
        self.kwargs = dict(model=model, **kwargs)
        mod = sys.modules["vllm"]
        self.settings: Settings = copy.copy(mod.settings)
        a = self.args
        self.tokenizer = AutoTokenizer.from_pretrained(a.tokenizer or a.model, trust_remote_code=a.trust_remote_code)
        self.dtype = self._resolve_dtype(a)
        self.model = AutoModelForCausalLM.from_pretrained(
            a.model, dtype=self.dtype, trust_remote_code=a.trust_remote_code, revision=a.revision
        ).eval()
        self.model.requires_grad_(False)
        self.vocab_size = self.model.get_output_embeddings().weight.shape[0]
        self.max_model_len = a.max_model_len or getattr(self.model.config, "max_position_embeddings", 2048)
        self.logprobs_mode = a.logprobs_mode
        self.block_size = a.block_size or 16
        self.prefix_caching = a.enable_prefix_caching is not False  # V1: on unless turned off
        self.eos_ids = self._eos_ids(GenerationConfig, a)
        self.generator = torch.Generator().manual_seed(a.seed if a.seed is not None else 0)
        noise_gen = torch.Generator().manual_seed(1_000_003 + (a.seed or 0))
        self.logit_bias = self.settings.logit_noise * torch.randn(self.vocab_size, generator=noise_gen)
        self.engine_model = EngineModel(self.model, self)
        in_process = self.settings.in_process
        if in_process is None:
            in_process = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "1") == "0"
        self.in_process = in_process
        self._worker = Worker(self.engine_model)
        executor = types.SimpleNamespace(driver_worker=WorkerWrapper(self._worker))
        self.llm_engine = types.SimpleNamespace(model_executor=executor) if in_process else types.SimpleNamespace()
        self.prefix: list[_PrefixEntry] = []
        self.events: list[tuple] = []
        self.requests: list[tuple[list[int], SamplingParams]] = []
        self.outputs: list[list[RequestOutput]] = []
        self.loaded: list[list[str]] = []
        self._ids = itertools.count()
        mod.engines.append(self)

    @staticmethod
    def _resolve_dtype(a: EngineArgs) -> torch.dtype:
        if a.dtype != "auto":
            return _DTYPES[a.dtype]
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(a.model, trust_remote_code=a.trust_remote_code)
        d = getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None) or torch.float32
        d = getattr(torch, d) if isinstance(d, str) else d
        return torch.bfloat16 if d == torch.float32 else d  # vLLM: "auto" downcasts float32 checkpoints

    def _eos_ids(self, generation_config_cls, a: EngineArgs) -> set[int]:
        ids = {self.tokenizer.eos_token_id} if self.tokenizer.eos_token_id is not None else set()
        if a.generation_config == "auto":
            try:
                gc = generation_config_cls.from_pretrained(a.model)
            except OSError:
                gc = None
            eos = getattr(gc, "eos_token_id", None)
            ids |= set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        return ids

    # ------------------------------------------------------------------------------ public API
    def get_tokenizer(self):
        return self.tokenizer

    def reset_prefix_cache(self, device: Any = None) -> bool:
        self.prefix.clear()
        self.events.append(("reset_prefix_cache",))
        return True

    def collective_rpc(self, method, timeout: float | None = None, args: tuple = (), kwargs: dict | None = None):
        """Run ``method`` (a worker method name, or a function called as method(worker, *args)) on every
        worker (one here); returns the list of results. Arguments cross a process boundary: tensors are copied."""
        name = method if isinstance(method, str) else getattr(method, "__name__", repr(method))
        self.events.append(("collective_rpc", name))
        if callable(method) and not self.in_process and os.environ.get("VLLM_ALLOW_INSECURE_SERIALIZATION") != "1":
            raise TypeError(
                f"Object of type {type(method).__name__} is not serializable. Set "
                "VLLM_ALLOW_INSECURE_SERIALIZATION=1 to allow fallback to pickle-based serialization."
            )
        args, kwargs = _copy_tensors(args), _copy_tensors(kwargs or {})
        if isinstance(method, str):
            return [getattr(self._worker, method)(*args, **kwargs)]
        return [method(self._worker, *args, **kwargs)]

    @torch.no_grad()
    def generate(
        self,
        prompts: Any,
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
        lora_request: Any = None,
        priority: Any = None,
    ) -> list[RequestOutput]:
        if lora_request is not None:
            raise NotImplementedError("the vLLM double does not serve LoRA requests")
        single = isinstance(prompts, (str, dict))
        prompts = [prompts] if single else list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params] * len(prompts)
        sampling_params = list(sampling_params)
        if len(sampling_params) != len(prompts):
            raise ValueError("The lengths of prompts and sampling_params must be the same.")
        for sp in sampling_params:
            if not isinstance(sp, SamplingParams):
                raise TypeError(f"sampling_params must be vllm.SamplingParams, got {type(sp).__name__}")
        self.events.append(("generate", len(prompts)))
        outs = []
        for prompt, sp in zip(prompts, sampling_params):
            ids, text = self._prompt_ids(prompt)
            self.requests.append((ids, sp))
            outs.append(self._run(ids, text, sp))
        self.outputs.append(outs)
        return outs

    # --------------------------------------------------------------------------------- internals
    def _prompt_ids(self, prompt: Any) -> tuple[list[int], str | None]:
        if isinstance(prompt, str):
            return list(self.tokenizer(prompt)["input_ids"]), prompt
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            ids = [int(t) for t in prompt["prompt_token_ids"]]
            return ids, prompt.get("prompt")
        raise TypeError(f"unsupported prompt {type(prompt).__name__}: use a str or {{'prompt_token_ids': [...]}}")

    def _run(self, ids: list[int], text: str | None, sp: SamplingParams) -> RequestOutput:
        if not ids:
            raise ValueError("The decoder prompt cannot be empty")
        if len(ids) >= self.max_model_len:
            raise ValueError(
                f"The decoder prompt (length {len(ids)}) is longer than the maximum model length of "
                f"{self.max_model_len}. Make sure that `max_model_len` is no smaller than the number of text tokens."
            )
        if max(ids) >= self.vocab_size or min(ids) < 0:
            raise ValueError(f"Token id {max(ids)} is out of vocabulary")
        if sp.logprobs is not None and sp.logprobs > self.args.max_logprobs:
            raise ValueError(f"Requested sample logprobs of {sp.logprobs}, which is greater than max allowed: 20")
        cache, logits, n_cached = self._prefill(ids)
        n = sp.n
        gens = [torch.Generator().manual_seed(sp.seed + j) if sp.seed is not None else self.generator for j in range(n)]
        if n > 1:
            cache.batch_repeat_interleave(n)
            logits = logits.repeat(n, 1)
        budget = self.max_model_len - len(ids)
        if sp.max_tokens is not None:
            budget = min(budget, sp.max_tokens)
        toks: list[list[int]] = [[] for _ in range(n)]
        lps: list[list[dict[int, Logprob]]] = [[] for _ in range(n)]
        finish: list[tuple[str, Any] | None] = [None] * n
        done_order: list[int] = []
        rows = list(range(n))  # sample j ↔ batch row rows.index(j)
        for step in range(budget):
            for r, j in enumerate(rows):
                tok, entry = self._sample(logits[r], sp, gens[j])
                toks[j].append(tok)
                lps[j].append(entry)
                finish[j] = self._check_stop(toks[j], sp, len(ids))
            ended = [r for r, j in enumerate(rows) if finish[j] is not None]
            for r in ended:
                j = rows[r]
                done_order.append(j)
                if self.prefix_caching and len(toks[j]) > 1:  # KV covers the prompt and all but the last token
                    row_cache = copy.deepcopy(cache)
                    row_cache.batch_select_indices(torch.tensor([r]))
                    self._remember(ids + toks[j][:-1], row_cache)
            keep = [r for r, j in enumerate(rows) if finish[j] is None]
            if not keep:
                break
            if len(keep) < len(rows):
                cache.batch_select_indices(torch.tensor(keep))
                rows = [rows[r] for r in keep]
            last = torch.tensor([[toks[j][-1]] for j in rows])
            pos = len(ids) + step
            out = self.model(
                input_ids=last,
                attention_mask=torch.ones(len(rows), pos + 1, dtype=torch.long),
                position_ids=torch.full((len(rows), 1), pos, dtype=torch.long),
                cache=cache,
                use_cache=True,
            )
            cache, logits = out.cache, out.logits[:, -1]
        comps = []
        for j in done_order:  # V1 may hand back a request's samples in the order they finished
            reason, stop_reason = finish[j]
            want = sp.logprobs is not None
            comps.append(
                CompletionOutput(
                    index=j,
                    text=self._text(toks[j], sp, stop_reason),
                    token_ids=list(toks[j]),
                    cumulative_logprob=sum(e[t].logprob for e, t in zip(lps[j], toks[j])) if want else None,
                    logprobs=lps[j] if want else None,
                    finish_reason=reason,
                    stop_reason=stop_reason,
                )
            )
        return RequestOutput(
            request_id=str(next(self._ids)),
            prompt=text,
            prompt_token_ids=list(ids),
            prompt_logprobs=None,
            outputs=comps,
            finished=True,
            num_cached_tokens=n_cached,
        )

    def _prefill(self, ids: list[int]):
        """(cache over all of ``ids``, (1, V) logits of the last token, tokens reused from the prefix cache)."""
        reuse, base = 0, None
        if self.prefix_caching:
            best = None
            for k, e in enumerate(self.prefix):
                common = len(os.path.commonprefix([list(e.tokens), ids]))
                if best is None or common > best[0]:
                    best = (common, k)
            if best is not None:
                # whole blocks only, and never the last prompt token (its logits are needed)
                reuse = (min(best[0], len(ids) - 1) // self.block_size) * self.block_size
                if reuse > 0:
                    entry = self.prefix.pop(best[1])
                    self.prefix.append(entry)  # LRU
                    base = copy.deepcopy(entry.cache)
                    extra = base.get_seq_length() - reuse
                    if extra > 0:
                        base.crop(-extra)
                else:
                    reuse = 0
        x = torch.tensor([ids[reuse:]])
        out = self.model(
            input_ids=x,
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            position_ids=torch.arange(reuse, len(ids))[None],
            cache=base,
            use_cache=True,
        )
        if self.prefix_caching:
            self._remember(ids, copy.deepcopy(out.cache))
        return out.cache, out.logits[:, -1], reuse

    def _remember(self, tokens: list[int], cache) -> None:
        key = tuple(tokens)
        self.prefix = [e for e in self.prefix if e.tokens != key]
        self.prefix.append(_PrefixEntry(key, cache))
        del self.prefix[: max(0, len(self.prefix) - self.settings.max_prefix_entries)]

    def _sample(self, logits: torch.Tensor, sp: SamplingParams, gen: torch.Generator):
        """One token from (V,) logits: (token id, {token: Logprob} for the configured logprobs_mode)."""
        raw = logits.float() + self.logit_bias
        if sp.temperature < _SAMPLING_EPS:
            processed = raw
            tok = int(raw.argmax())
        else:
            processed = raw / sp.temperature
            k = sp.top_k if sp.top_k > 0 else 0
            if 0 < k < processed.shape[-1]:
                kth = torch.topk(processed, k).values[-1]
                processed = processed.masked_fill(processed < kth, float("-inf"))
            if sp.top_p < 1.0:  # vLLM's rule: ascending sort, drop while the cumulative mass ≤ 1 − p
                srt, order = processed.sort(descending=False)
                cum = srt.softmax(-1).cumsum(-1)
                drop = cum <= 1 - sp.top_p
                drop[-1] = False
                processed = processed.scatter(-1, order, srt.masked_fill(drop, float("-inf")))
            probs = processed.softmax(-1)
            q = torch.empty_like(probs).exponential_(generator=gen)
            tok = int((probs / q).argmax())
        mode = self.logprobs_mode
        vec = {
            "raw_logprobs": lambda: raw.log_softmax(-1),
            "raw_logits": lambda: raw,
            "processed_logprobs": lambda: processed.log_softmax(-1),
            "processed_logits": lambda: processed,
        }[mode]()
        entry: dict[int, Logprob] = {}
        if sp.logprobs is not None:
            top = torch.topk(vec, sp.logprobs).indices.tolist() if sp.logprobs > 0 else []
            for t in [tok, *top]:
                if t not in entry:
                    v = float(vec[t])
                    rank = int((vec > vec[t]).sum()) + 1
                    entry[t] = Logprob(logprob=v, rank=rank, decoded_token=self.tokenizer.decode([t]))
        return tok, entry

    def _check_stop(self, toks: list[int], sp: SamplingParams, prompt_len: int) -> tuple[str, Any] | None:
        last = toks[-1]
        if len(toks) >= sp.min_tokens:
            if not sp.ignore_eos and last in self.eos_ids:
                return ("stop", None)
            if last in sp.stop_token_ids:
                return ("stop", last)
            if sp.stop:
                text = self.tokenizer.decode(toks, skip_special_tokens=sp.skip_special_tokens)
                hit = [s for s in sp.stop if s in text]
                if hit:
                    return ("stop", min(hit, key=text.index))
        if (sp.max_tokens is not None and len(toks) >= sp.max_tokens) or prompt_len + len(toks) >= self.max_model_len:
            return ("length", None)
        return None

    def _text(self, toks: list[int], sp: SamplingParams, stop_reason: Any) -> str:
        text = self.tokenizer.decode(toks, skip_special_tokens=sp.skip_special_tokens)
        if isinstance(stop_reason, str):
            at = text.index(stop_reason)
            text = text[: at + len(stop_reason)] if sp.include_stop_str_in_output else text[:at]
        return text


def _copy_tensors(x):
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, (list, tuple)):
        return type(x)(_copy_tensors(v) for v in x)
    if isinstance(x, dict):
        return {k: _copy_tensors(v) for k, v in x.items()}
    return x


# ------------------------------------------------------------------------------------------ module


def make_module(settings: Settings | None = None) -> dict[str, types.ModuleType]:
    """The fake ``vllm`` package and its submodules, by module name."""
    vllm = types.ModuleType("vllm")
    vllm.__version__ = VERSION
    vllm.LLM, vllm.SamplingParams, vllm.EngineArgs = LLM, SamplingParams, EngineArgs
    vllm.RequestOutput, vllm.CompletionOutput = RequestOutput, CompletionOutput
    vllm.settings = settings or Settings()
    vllm.engines = []
    engine, arg_utils = types.ModuleType("vllm.engine"), types.ModuleType("vllm.engine.arg_utils")
    arg_utils.EngineArgs = EngineArgs
    engine.arg_utils = arg_utils
    outputs = types.ModuleType("vllm.outputs")
    outputs.RequestOutput, outputs.CompletionOutput = RequestOutput, CompletionOutput
    logprobs, sequence = types.ModuleType("vllm.logprobs"), types.ModuleType("vllm.sequence")
    logprobs.Logprob = sequence.Logprob = Logprob
    inputs = types.ModuleType("vllm.inputs")
    inputs.TokensPrompt = dict
    sampling = types.ModuleType("vllm.sampling_params")
    sampling.SamplingParams = SamplingParams
    vllm.engine, vllm.outputs, vllm.logprobs, vllm.sequence, vllm.inputs = engine, outputs, logprobs, sequence, inputs
    vllm.sampling_params = sampling
    mods = [vllm, engine, arg_utils, outputs, logprobs, sequence, inputs, sampling]
    return {m.__name__: m for m in mods}


def install(monkeypatch, **settings: Any) -> types.ModuleType:
    """Install the double as ``vllm`` for one test (undone by ``monkeypatch``); returns the module.

    ``settings``: :class:`Settings` fields (e.g. ``logit_noise=0.5``); also settable later through
    ``mod.settings`` for engines built after. The engine-in-process switch rlhf-pg sets
    (VLLM_ENABLE_V1_MULTIPROCESSING) is restored after the test too."""
    mods = make_module(Settings(**settings))
    for name, m in mods.items():
        monkeypatch.setitem(sys.modules, name, m)
    name = "VLLM_ENABLE_V1_MULTIPROCESSING"  # VLLMBackend sets it (setdefault): restore it after the test
    was = os.environ.get(name)
    monkeypatch.setenv(name, was if was is not None else "")
    if was is None:
        monkeypatch.delenv(name)
    return mods["vllm"]


def engine_logprobs(outputs: Sequence[RequestOutput], group_size: int, lengths: Sequence[int]) -> list[list[float]]:
    """The engine's reported log-prob of each kept token, per Batch row (row i·G + j = prompt i, sample index j)."""
    rows = []
    for out in outputs:
        comps = sorted(out.outputs, key=lambda c: c.index)
        assert len(comps) == group_size
        for c in comps:
            rows.append([c.logprobs[t][tok].logprob for t, tok in enumerate(c.token_ids)])
    return [r[:n] for r, n in zip(rows, lengths)]


__all__ = [
    "CompletionOutput",
    "EngineArgs",
    "LLM",
    "Logprob",
    "RequestOutput",
    "SamplingParams",
    "Settings",
    "engine_logprobs",
    "install",
    "make_module",
]
