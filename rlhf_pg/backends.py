"""Pluggable generation backends: who samples the rollout's completions.

The trainer talks to one object with two methods::

    batch = backend.generate(prompt_ids, group_size, params, uniforms)   # → Batch (see batch.py)
    backend.sync_weights(model)                                          # after the policy changed
    with backend.episodes(prompt_ids, params, uniforms) as session: ...  # multi-turn (envs.py)

``episodes`` yields a :class:`~rlhf_pg.rollout.EpisodeSession` that samples one model turn at a time
for every live episode and appends the environment's segments as tokens (HF: one KV cache carried
across turns; vLLM: each turn one request with the whole token history, reusing vLLM's prefix cache).

``generate`` returns the same :class:`~rlhf_pg.batch.Batch` fields as :func:`rlhf_pg.rollout.generate`:
``prompt_ids``/``prompt_mask`` (B, P) left-padded, ``completion_ids``/``completion_mask`` (B, T) cut
after EOS or the token that completes a stop string (pad id and mask 0 after it), ``old_logprobs``
(B, T), ``group_size``; rows i·G … i·G+G−1 belong to prompt i.

``exact_logprobs`` says whether ``old_logprobs`` are exactly what the trainer's own forward pass
computes, log softmax(logits/τ) of the sampled token under the UNtruncated tempered policy (top-k/
top-p change only which tokens can be drawn). When it is False the trainer must recompute them with
its own no-grad forward before using them (KL in the reward, several epochs or minibatches).

Backends (``BACKENDS``):

* ``hf`` — :class:`HFBackend`, the built-in KV-cache sampler running on the training module itself
  (rollout.generate, unchanged). It shares the module, so ``sync_weights`` has nothing to do, and its
  log-probs are exact.
* ``vllm`` — :class:`VLLMBackend`, a vLLM engine for GPU users (``pip install vllm``), import-guarded:
  without vllm it raises a one-line :class:`~rlhf_pg.errors.UserError`. Its weights are a copy, so
  the trainer must call ``sync_weights`` after the policy changes; its log-probs are not exact.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any, ClassVar

import torch

from . import rollout
from .batch import Batch
from .errors import UserError
from .rollout import SamplingParams, left_pad, stop_cut

# ------------------------------------------------------------------------------------ interface


class GenerationBackend(ABC):
    """Samples G completions per prompt and returns them as a :class:`Batch` (see module docstring)."""

    name: ClassVar[str] = ""
    exact_logprobs: ClassVar[bool] = True
    """True: ``old_logprobs`` equal the trainer's own log softmax(logits/τ) of the sampled tokens."""
    uses_training_module: ClassVar[bool] = False
    """True: samples with the trained module itself, so it takes the trainer's ``context`` (weights
    gathered under ZeRO-3/FSDP, autocast) and needs no weight sync."""

    def sampling_context(self) -> AbstractContextManager:
        """What :func:`rlhf_pg.rollout.sample` enters around :meth:`generate` (nothing by default)."""
        return nullcontext()

    @abstractmethod
    def generate(
        self,
        prompt_ids: list[list[int]],
        group_size: int,
        params: SamplingParams,
        uniforms: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Batch:
        """``group_size`` completions for each prompt (token id lists) → Batch of len(prompt_ids)·G rows.

        ``uniforms`` (B, max_new_tokens) in [0, 1): the trainer's per-(seed, step, global row) draws.
        A backend that can sample by inverse CDF uses them (HF); others may derive seeds from them.
        ``generator``: the random source when ``uniforms`` is None (HF only)."""

    @contextmanager
    def episodes(
        self,
        prompt_ids: list[list[int]],
        params: SamplingParams,
        uniforms: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Iterator[rollout.EpisodeSession]:
        """A session sampling multi-turn episodes, one per prompt (the G copies of a prompt already
        repeated), for :func:`rlhf_pg.envs.sample_episodes`. ``uniforms`` (B, W): episode b's k-th
        sampled token uses uniforms[b, k]."""
        raise UserError(f"rollout.backend={self.name} cannot sample multi-turn episodes — use rollout.backend=hf")
        yield  # pragma: no cover

    def sync_weights(self, model: torch.nn.Module) -> None:  # noqa: B027 (optional hook: a no-op by default)
        """Make the backend sample from ``model``'s current weights; call after the policy changed
        (after the optimizer steps of an RL step, and after loading a checkpoint)."""

    def close(self) -> None:  # noqa: B027 (optional hook)
        """Release the backend's resources (engines, GPU memory)."""


# ------------------------------------------------------------------------------------------- hf


class HFBackend(GenerationBackend):
    """The built-in sampler (:func:`rlhf_pg.rollout.generate`) on the training module itself.

    The module is put in eval mode with the KV cache on for the call, then restored. Exact
    log-probs; ``sync_weights`` is a no-op because the backend samples from the very module the
    optimizer updates. ``context``: a factory of the context to sample in (the trainer's gathers
    sharded weights and enters its autocast)."""

    name = "hf"
    exact_logprobs = True
    uses_training_module = True

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        context: Callable[[], AbstractContextManager] | None = None,
        decode: str = "auto",
        **options: Any,
    ):
        if options:
            raise UserError(
                f"rollout.backend=hf takes no backend options (got {', '.join(sorted(options))}): "
                "remove rollout.backend_options"
            )
        self.model, self.tokenizer, self.context = model, tokenizer, context
        self.decode = resolve_decode(decode, model)

    def sampling_context(self) -> AbstractContextManager:
        return self.context() if self.context is not None else nullcontext()

    def generate(
        self,
        prompt_ids: list[list[int]],
        group_size: int,
        params: SamplingParams,
        uniforms: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Batch:
        with rollout.sampling_mode(self.model) as model:
            return rollout.generate(
                model, self.tokenizer, prompt_ids, group_size, params, generator, uniforms, decode=self.decode
            )

    @contextmanager
    def episodes(self, prompt_ids, params, uniforms=None, generator=None) -> Iterator[rollout.EpisodeSession]:
        with rollout.sampling_mode(self.model) as model:
            yield rollout.HFEpisodeSession(
                model, self.tokenizer, prompt_ids, params, uniforms, generator, decode=self.decode
            )


def resolve_decode(decode: str, model: torch.nn.Module) -> str:
    """`lean` or `hf` for ``rollout.decode`` on ``model`` (see rlhf_pg/decode.py); an explicit `lean` on a
    model the lean step does not cover is a user error that says why."""
    from .decode import unsupported

    if decode == "hf":
        return "hf"
    reason = unsupported(model)
    if reason is None:
        return "lean"
    if decode == "lean":
        raise UserError(f"rollout.decode=lean cannot decode this model: {reason} — use rollout.decode=auto or hf")
    return "hf"


# ----------------------------------------------------------------------------------------- vllm

VLLM_MISSING = "rollout.backend=vllm needs the vllm package and a CUDA GPU: pip install vllm"


def _import_vllm():
    try:
        return importlib.import_module("vllm")
    except ImportError as err:
        raise UserError(VLLM_MISSING) from err


def vllm_outputs_to_batch(
    outputs: Sequence[Any],
    prompts: list[list[int]],
    group_size: int,
    *,
    pad_id: int,
    eos_id: int | None,
    max_new_tokens: int,
    tokenizer=None,
    stop: Sequence[str] = (),
    device: torch.device | str = "cpu",
) -> Batch:
    """vLLM ``RequestOutput`` objects (one per prompt, in prompt order) → :class:`Batch`.

    Pure (no vllm import): reads ``out.outputs[j].token_ids``, ``.logprobs`` (a list with one
    ``{token_id: Logprob}`` mapping per generated token, as returned with ``SamplingParams(logprobs=0)``;
    entries may also be plain floats), ``.index`` (sample order within the group; list order if absent)
    and ``out.prompt_token_ids`` (checked against ``prompts`` when present, to catch reordering).

    The cut follows :func:`rlhf_pg.rollout.generate` whatever vLLM did: a completion ends at its first
    ``eos_id`` or at the first token after which the decoded text contains a stop string (only checked
    when ``tokenizer`` and ``stop`` are given), and at ``max_new_tokens``; the mask is 1 up to and
    including that token. ``old_logprobs`` hold vLLM's log-prob of each sampled token (0 on padding,
    and 0 everywhere when vLLM returned none)."""
    G = group_size
    if len(outputs) != len(prompts):
        raise ValueError(f"vLLM returned {len(outputs)} outputs for {len(prompts)} prompts")
    stops = [s for s in stop if s] if tokenizer is not None else []
    rows: list[list[int]] = []
    row_logps: list[list[float]] = []
    for i, (out, prompt) in enumerate(zip(outputs, prompts)):
        got = getattr(out, "prompt_token_ids", None)
        if got is not None and list(got) != list(prompt):
            raise ValueError(f"vLLM output {i} belongs to another prompt (outputs out of order)")
        comps = list(out.outputs)
        if len(comps) != G:
            raise ValueError(f"vLLM returned {len(comps)} completions for prompt {i}, expected group_size={G}")
        if all(getattr(c, "index", None) is not None for c in comps):
            comps.sort(key=lambda c: c.index)
        for c in comps:
            ids = list(c.token_ids)[:max_new_tokens]
            n = len(ids)
            if eos_id is not None and eos_id in ids:
                n = ids.index(eos_id) + 1
            if stops:
                n = min(n, stop_cut(tokenizer, ids[:n], stops))
            ids = ids[:n]
            rows.append(ids)
            row_logps.append(_sampled_logprobs(c.logprobs, ids))
    B = len(rows)
    T = max((len(r) for r in rows), default=0)
    completion_ids = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.float32)
    logps = torch.zeros((B, T), dtype=torch.float32)
    for b, (ids, lps) in enumerate(zip(rows, row_logps)):
        if ids:
            completion_ids[b, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            mask[b, : len(ids)] = 1.0
            logps[b, : len(ids)] = torch.tensor(lps, dtype=torch.float32)
    prompt_ids, prompt_mask = left_pad(prompts, pad_id)
    return Batch(
        prompt_ids=prompt_ids.repeat_interleave(G, 0).to(device),
        prompt_mask=prompt_mask.repeat_interleave(G, 0).to(device),
        completion_ids=completion_ids.to(device),
        completion_mask=mask.to(device),
        old_logprobs=(logps * mask).to(device),
        group_size=G,
    )


def _sampled_logprobs(logprobs: Sequence[Any] | None, ids: list[int]) -> list[float]:
    if logprobs is None:
        return [0.0] * len(ids)
    if len(logprobs) < len(ids):
        raise ValueError(f"vLLM returned {len(logprobs)} log-probs for {len(ids)} tokens")
    vals = []
    for t, tok in enumerate(ids):
        entry = logprobs[t]
        if isinstance(entry, dict) or hasattr(entry, "keys"):
            if tok not in entry:
                raise ValueError(f"vLLM log-probs at position {t} lack the sampled token {tok}")
            entry = entry[tok]
        vals.append(float(getattr(entry, "logprob", entry)))
    return vals


def vllm_sampling_kwargs(params: SamplingParams, group_size: int, seed: int | None = None) -> dict[str, Any]:
    """Keyword arguments of ``vllm.SamplingParams`` for one prompt's G samples (pure)."""
    return dict(
        n=group_size,
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k if params.top_k > 0 else -1,  # vLLM: -1 = off (newer versions also accept 0)
        max_tokens=params.max_new_tokens,
        stop=list(params.stop) or None,
        logprobs=0,  # 0 = only the sampled token's log-prob
        include_stop_str_in_output=True,  # our cut keeps the token that completes a stop string
        seed=seed,
    )


def request_seeds(uniforms: torch.Tensor | None, n_prompts: int, group_size: int) -> list[int | None]:
    """One vLLM seed per prompt from the trainer's uniforms (row i·G, draw 0), or None without them.

    The uniforms depend only on (seed, step, global row), so the seeds — and hence vLLM's samples,
    for a given engine — do not depend on the number of processes. vLLM gives sample j of a request
    seed + j, so the G samples differ. (vLLM cannot follow our inverse-CDF draws themselves.)"""
    if uniforms is None:
        return [None] * n_prompts
    u = uniforms[::group_size, 0].double().cpu()
    return [int(x * (2**31 - 1)) for x in u.tolist()]


def vllm_engine_kwargs(
    model_name: str,
    *,
    supported: set[str] | None,
    dtype: str = "auto",
    gpu_memory_utilization: float = 0.3,
    seed: int = 0,
    max_model_len: int | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Keyword arguments of ``vllm.LLM`` (pure). ``supported`` = the installed vLLM's EngineArgs field
    names (None if unknown): ``logprobs_mode="processed_logprobs"`` is passed only where it exists."""
    kw: dict[str, Any] = dict(
        model=model_name,
        dtype=dtype,
        gpu_memory_utilization=gpu_memory_utilization,
        enable_prefix_caching=True,
        seed=seed,
    )
    if max_model_len is not None:
        kw["max_model_len"] = max_model_len
    if supported is not None and "logprobs_mode" in supported:
        kw["logprobs_mode"] = "processed_logprobs"
    kw.update(extra or {})
    return kw


def vllm_logprobs_match_policy(logprobs_mode: str | None, params: SamplingParams) -> bool:
    """Whether the log-prob vLLM returns for a sampled token is, mathematically, ours:
    log softmax(logits/τ)[a] of the UNtruncated tempered policy (log softmax(logits) when τ = 0).

    What vLLM returns (vllm/v1/sample/sampler.py, topk_topp_sampler.py; V1 engine):

    * ``raw_logprobs`` (V1 default): log softmax of the raw logits — no temperature, no top-k/top-p;
    * ``processed_logprobs`` (vLLM ≥ 0.10.1, PR #21398): after penalties, temperature AND top-k/top-p,
      i.e. log-probs of the truncated, renormalised distribution;
    * ``None`` = the V0 engine, whose sampler returned the processed (tempered, truncated) log-probs.

    So they match only without top-k/top-p, and with τ ∉ {0, 1} only in a processed mode. Even then
    they come from vLLM's kernels in the engine's dtype, not the trainer's forward, so they are never
    bit-equal to it: that is why :attr:`VLLMBackend.exact_logprobs` is False regardless."""
    if params.top_p < 1.0 or params.top_k > 0:
        return False
    if params.temperature in (0, 1):
        return True
    return logprobs_mode in (None, "processed_logprobs")


def hf_weights(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs of ``model`` under Hugging Face checkpoint names, what vLLM's
    ``load_weights`` expects. For a peft model, use inside :func:`merged_adapter` (the base weights
    then hold W + (α/r)·B·A): wrapper prefixes and ``.base_layer`` are dropped, LoRA tensors skipped."""
    peft = hasattr(model, "peft_config")
    for name, t in model.state_dict().items():
        if peft:
            if "lora_" in name or "original_module" in name:
                continue
            name = name.removeprefix("base_model.model.").replace(".base_layer", "")
            name = name.replace("modules_to_save.default.", "")
        yield name, t.detach()


@contextmanager
def merged_adapter(model: torch.nn.Module):
    """Merge a peft model's adapter into its base weights for the duration (no-op otherwise)."""
    if not hasattr(model, "merge_adapter"):
        yield model
        return
    model.merge_adapter()
    try:
        yield model
    finally:
        model.unmerge_adapter()


def _engine_model(llm) -> Any | None:
    """The engine's torch model when the engine runs in this process (vLLM V0, or V1 with
    ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` / the external_launcher executor, as TRL's colocate mode)."""
    paths: list[Callable[[Any], Any]] = [
        lambda x: x.llm_engine.model_executor.driver_worker.model_runner.model,
        lambda x: x.llm_engine.model_executor.driver_worker.worker.model_runner.model,
    ]
    for get in paths:
        try:
            m = get(llm)
        except AttributeError:
            continue
        if hasattr(m, "load_weights"):
            return m
    return None


def _load_weights_on_worker(worker, weights):  # runs inside a vLLM worker (collective_rpc)
    worker.model_runner.model.load_weights(weights)


class VLLMBackend(GenerationBackend):
    """Generation with vLLM (GPU). Targets vLLM ≥ 0.10.1 (V1 engine, ``logprobs_mode``); older
    versions work without ``logprobs_mode`` (V0's log-probs are the processed ones).

    * Engine: ``vllm.LLM(model=path, dtype, gpu_memory_utilization, enable_prefix_caching=True, seed,
      logprobs_mode="processed_logprobs")`` in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0`` is set
      unless the user set it), sharing the GPU with the trainer, as TRL's "colocate" mode. ``path``
      defaults to the model's ``config._name_or_path``. Options: ``model_name``, ``dtype`` ("auto"),
      ``gpu_memory_utilization`` (0.3), ``max_model_len``, ``seed`` (0), ``seed_from_uniforms`` (True),
      ``allow_cpu`` (False; for a CPU build of vLLM), anything else is passed to ``vllm.LLM``.
    * Sampling: one request per prompt with ``SamplingParams(n=G, temperature, top_p, top_k (-1 = off),
      max_tokens, stop, logprobs=0, seed)`` from token ids (``{"prompt_token_ids": ids}``, i.e. a
      ``TokensPrompt``). The prompt is prefilled once for its G samples. The seed comes from the
      trainer's uniforms (:func:`request_seeds`) so runs are reproducible; per-request seeds make
      vLLM use its PyTorch sampler instead of FlashInfer's — set ``seed_from_uniforms: false`` for speed.
      vLLM also stops at the EOS ids of the model's generation_config; EOS/stop/length cuts are then
      re-applied exactly as the HF sampler does (:func:`vllm_outputs_to_batch`).
    * Log-probs: ``old_logprobs`` hold vLLM's log-prob of each sampled token (see
      :func:`vllm_logprobs_match_policy` for what they are). ``exact_logprobs = False``: the trainer
      must recompute old log-probs with its own forward; vLLM's stay useful as behaviour log-probs
      (e.g. to measure or correct the train/inference mismatch).
    * ``sync_weights(model)``: streams the policy's weights (a peft adapter merged in) into the engine
      — ``llm.llm_engine.model_executor.driver_worker.model_runner.model.load_weights(...)`` when the
      engine is in-process (what TRL's colocate mode does), otherwise through ``llm.collective_rpc``
      (needs ``VLLM_ALLOW_INSECURE_SERIALIZATION=1`` on V1; copies via CPU, slow for big models) —
      then resets the prefix cache, whose KV entries were computed with the old weights.

    One engine per process; multi-GPU data parallelism (``distributed_executor_backend=
    "external_launcher"``, as TRL) is not wired up here."""

    name = "vllm"
    exact_logprobs = False

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        *,
        model_name: str | None = None,
        dtype: str = "auto",
        gpu_memory_utilization: float = 0.3,
        max_model_len: int | None = None,
        seed: int = 0,
        seed_from_uniforms: bool = True,
        allow_cpu: bool = False,
        **llm_kwargs: Any,
    ):
        vllm = _import_vllm()
        if not allow_cpu and not torch.cuda.is_available():
            raise UserError(VLLM_MISSING)
        self.vllm, self.tokenizer = vllm, tokenizer
        self.seed_from_uniforms = seed_from_uniforms
        self.device = next(model.parameters()).device  # where the trainer wants the batch
        path = model_name or getattr(getattr(model, "config", None), "_name_or_path", None)
        if not path:
            raise UserError(
                "rollout.backend=vllm: cannot tell which checkpoint to load into vLLM; "
                "set rollout.backend_options.model_name"
            )
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        kwargs = vllm_engine_kwargs(
            path,
            supported=_engine_arg_names(),
            dtype=dtype,
            gpu_memory_utilization=gpu_memory_utilization,
            seed=seed,
            max_model_len=max_model_len,
            extra=llm_kwargs,
        )
        self.logprobs_mode: str | None = kwargs.get("logprobs_mode")
        self.llm = vllm.LLM(**kwargs)

    def generate(
        self,
        prompt_ids: list[list[int]],
        group_size: int,
        params: SamplingParams,
        uniforms: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Batch:
        seeds = request_seeds(uniforms if self.seed_from_uniforms else None, len(prompt_ids), group_size)
        sps = [self.vllm.SamplingParams(**vllm_sampling_kwargs(params, group_size, s)) for s in seeds]
        outputs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompt_ids], sps, use_tqdm=False)
        return vllm_outputs_to_batch(
            outputs,
            prompt_ids,
            group_size,
            pad_id=self.tokenizer.pad_token_id,
            eos_id=self.tokenizer.eos_token_id,
            max_new_tokens=params.max_new_tokens,
            tokenizer=self.tokenizer,
            stop=params.stop,
            device=self.device,
        )

    @contextmanager
    def episodes(self, prompt_ids, params, uniforms=None, generator=None) -> Iterator[rollout.EpisodeSession]:
        yield VLLMEpisodeSession(self.llm, self.vllm.SamplingParams, self.tokenizer, prompt_ids, params, uniforms)

    def sync_weights(self, model: torch.nn.Module) -> None:
        with torch.no_grad(), merged_adapter(model):
            target = _engine_model(self.llm)
            if target is not None:
                target.load_weights(hf_weights(model))
            else:
                weights = [(n, t.cpu()) for n, t in hf_weights(model)]
                self.llm.collective_rpc(_load_weights_on_worker, args=(weights,))
        if hasattr(self.llm, "reset_prefix_cache"):
            self.llm.reset_prefix_cache()

    def close(self) -> None:
        self.llm = None


class VLLMEpisodeSession(rollout.EpisodeSession):
    """Episodes on a vLLM engine: each turn is one request per live episode whose prompt is the
    episode's whole token history so far (``{"prompt_token_ids": ...}``: token in, token out, nothing
    re-tokenized). vLLM's prefix cache keeps the history's KV entries between turns, so a turn costs
    its new tokens, not a re-prefill (``enable_prefix_caching=True``, set by :class:`VLLMBackend`).
    Cuts follow the HF sampler (EOS, the token completing a stop string, the turn's token budget).
    The seed of episode b's turn comes from uniforms[b, k], k its actions so far (:func:`request_seeds`)."""

    def __init__(self, llm, sampling_params_cls, tokenizer, prompts, params: SamplingParams, uniforms=None):
        self.llm, self.make_params, self.tokenizer, self.params = llm, sampling_params_cls, tokenizer, params
        self.uniforms = uniforms
        self.history = [list(p) for p in prompts]
        self.live = list(range(len(prompts)))
        self.n_actions = [0] * len(prompts)

    def _seed(self, episode: int) -> int | None:
        if self.uniforms is None:
            return None
        k = min(self.n_actions[episode], self.uniforms.shape[1] - 1)
        return int(float(self.uniforms[episode, k]) * (2**31 - 1))

    def turn(self, max_tokens: list[int]) -> list[tuple[list[int], list[float]]]:
        out: list[tuple[list[int], list[float]]] = [([], []) for _ in self.live]
        asks = [i for i, m in enumerate(max_tokens) if m > 0]
        if not asks:
            return out
        sps = []
        for i in asks:
            turn_params = dataclasses.replace(self.params, max_new_tokens=max_tokens[i])
            sps.append(self.make_params(**vllm_sampling_kwargs(turn_params, 1, self._seed(self.live[i]))))
        prompts = [self.history[self.live[i]] for i in asks]
        outputs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], sps, use_tqdm=False)
        if len(outputs) != len(asks):
            raise ValueError(f"vLLM returned {len(outputs)} outputs for {len(asks)} episodes")
        eos, stops = self.tokenizer.eos_token_id, [x for x in self.params.stop if x]
        for i, res in zip(asks, outputs):
            got = getattr(res, "prompt_token_ids", None)
            if got is not None and list(got) != self.history[self.live[i]]:
                raise ValueError("vLLM output belongs to another episode (outputs out of order)")
            c = res.outputs[0]
            ids = list(c.token_ids)[: max_tokens[i]]
            n = ids.index(eos) + 1 if eos is not None and eos in ids else len(ids)
            if stops:
                n = min(n, stop_cut(self.tokenizer, ids[:n], stops))
            ids = ids[:n]
            out[i] = (ids, _sampled_logprobs(c.logprobs, ids))
            self.history[self.live[i]] += ids
            self.n_actions[self.live[i]] += len(ids)
        return out

    def keep(self, positions: list[int]) -> None:
        self.live = [self.live[i] for i in positions]

    def extend(self, segments: list[list[int]]) -> None:
        for e, seg in zip(self.live, segments):
            self.history[e] += list(seg)


def _engine_arg_names() -> set[str] | None:
    try:
        from vllm.engine.arg_utils import EngineArgs  # type: ignore[import-not-found]

        return {f.name for f in dataclasses.fields(EngineArgs)}
    except Exception:  # noqa: BLE001 — unknown layout: do not pass optional arguments
        return None


# ------------------------------------------------------------------------------------- registry

BACKENDS: dict[str, type[GenerationBackend]] = {"hf": HFBackend, "vllm": VLLMBackend}


def make_backend(
    name: str,
    model: torch.nn.Module,
    tokenizer,
    context: Callable[[], AbstractContextManager] | None = None,
    decode: str = "auto",
    **options: Any,
) -> GenerationBackend:
    """The backend called ``name`` (``rollout.backend``) with ``options`` (``rollout.backend_options``).
    ``context`` and ``decode`` (``rollout.decode``) reach backends that sample with the training module
    (``uses_training_module``)."""
    cls = BACKENDS.get(name)
    if cls is None:
        raise UserError(
            f"rollout.backend={name!r} is not a generation backend: choose one of {', '.join(sorted(BACKENDS))}"
        )
    if cls.uses_training_module:
        options["context"] = context
        options["decode"] = decode
    elif decode != "auto":
        raise UserError(f"rollout.decode={decode} applies to rollout.backend=hf only: remove it for {name}")
    return cls(model, tokenizer, **options)


__all__ = [
    "BACKENDS",
    "GenerationBackend",
    "HFBackend",
    "VLLMBackend",
    "VLLMEpisodeSession",
    "VLLM_MISSING",
    "hf_weights",
    "make_backend",
    "merged_adapter",
    "request_seeds",
    "resolve_decode",
    "vllm_engine_kwargs",
    "vllm_logprobs_match_policy",
    "vllm_outputs_to_batch",
    "vllm_sampling_kwargs",
]
