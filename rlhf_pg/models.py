"""Loading models and tokenizers, value heads, and LoRA / bitsandbytes set-up.

:func:`load_model` and :func:`load_tokenizer` take an alias, a local path or a hub id (resolved by
:func:`rlhf_pg.model_cache.resolve_model`) and turn loading failures into one-line
:class:`UserError` messages. :class:`PolicyWithValue` (shared backbone) and :class:`ValueModel` (separate
critic) add a scalar value head; :func:`apply_lora` and :func:`bitsandbytes_config` set up
parameter-efficient training. The aliases, the cache and the GGUF conversion live in
:mod:`rlhf_pg.model_cache`; their public names are re-exported here.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from rlhf_pg.errors import UserError, one_line
from rlhf_pg.model_cache import (  # noqa: F401  (re-exported: callers import these from models)
    ALIASES,
    CHATML_END,
    SMOLLM2_ALIAS,
    SMOLLM2_DISTRIBUTION,
    SMOLLM2_DISTRIBUTION_VERSION,
    SMOLLM2_GGUF_RELPATH,
    SMOLLM2_MAX_LENGTH,
    TINY_ALIAS,
    TOKENIZER_ASSET_DIR,
    cache_dir,
    configure_chatml_tokenizer,
    resolve_model,
    smollm2_gguf_path,
    tokenizer_from_gguf,
)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str, device: str | torch.device) -> torch.dtype:
    """Turn a dtype name into a ``torch.dtype``.

    ``"auto"`` is float32 on CPU, and on CUDA bfloat16 where supported, else float16.
    ``"float32"``, ``"bfloat16"`` and ``"float16"`` are taken literally.
    """
    if dtype == "auto":
        try:
            device_type = torch.device(device).type
        except RuntimeError:
            raise UserError(f"unknown device '{device}': use cpu, cuda or cuda:N") from None
        if device_type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in _DTYPES:
        raise UserError(f"unknown dtype '{dtype}': use one of auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def load_tokenizer(
    name: str, *, trust_remote_code: bool = False, revision: str | None = None
) -> PreTrainedTokenizerBase:
    """Load the tokenizer for a model name or alias, left-padded and with a pad token.

    A tokenizer without a pad token gets its eos token as pad token; one with neither raises
    :class:`UserError`.
    """
    location = resolve_model(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, trust_remote_code=trust_remote_code, revision=revision)
    except (OSError, ValueError) as err:
        raise _load_error("tokenizer", name, location, err) from err
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise UserError(
                f"tokenizer of '{name}' has neither a pad nor an eos token: "
                "use a model whose tokenizer defines an eos token"
            )
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    name: str,
    dtype: str = "auto",
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
    revision: str | None = None,
    quantization_config=None,
) -> PreTrainedModel:
    """Load a causal LM by alias, local path or hub id onto ``device`` in the resolved dtype.

    ``generation_config.pad_token_id`` is filled in (from the config's pad or eos id) when missing.
    With a ``quantization_config`` (bitsandbytes 4/8-bit) the weights are placed by transformers.
    """
    torch_dtype = resolve_dtype(dtype, device)
    location = resolve_model(name)
    extra = {"quantization_config": quantization_config, "device_map": {"": device}} if quantization_config else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(
            location, dtype=torch_dtype, trust_remote_code=trust_remote_code, revision=revision, **extra
        )
    except (OSError, ValueError) as err:
        raise _load_error("model", name, location, err) from err
    generation_config = model.generation_config
    if generation_config is not None and generation_config.pad_token_id is None:
        pad = getattr(model.config, "pad_token_id", None)
        if pad is None:
            pad = generation_config.eos_token_id
        if isinstance(pad, list):
            pad = pad[0]
        generation_config.pad_token_id = pad
    return model if quantization_config else model.to(device)


def _load_error(what: str, name: str, location: str, err: Exception) -> UserError:
    """Translate a ``from_pretrained`` failure into a one-line :class:`UserError`."""
    reason = one_line(err)
    if Path(location).exists():
        return UserError(
            f"could not load {what} from local path '{location}' ({reason}): point the model "
            "name at a directory written by save_pretrained (with config.json)"
        )
    if isinstance(err, OSError):
        return UserError(
            f"{what} '{name}' could not be found locally or downloaded (offline?): pass a local "
            f"model directory or an alias ({', '.join(ALIASES)})"
        )
    return UserError(
        f"could not load {what} '{name}' ({reason}): use a causal language model that "
        "transformers' AutoModelForCausalLM supports"
    )


class _WithValueHead(torch.nn.Module):
    """A transformer body (attribute ``_body``) plus a scalar value head V(s_t) = w·h_t + b that
    starts at zero (V ≡ 0 before training)."""

    _body: str

    def _add_value_head(self, config, device) -> None:
        self.value_head = torch.nn.Linear(config.get_text_config().hidden_size, 1, dtype=torch.float32)
        torch.nn.init.zeros_(self.value_head.weight)
        torch.nn.init.zeros_(self.value_head.bias)
        self.value_head.to(device)

    def save_pretrained(self, path: str | Path, state_dict: dict | None = None) -> None:
        """The body with its own ``save_pretrained`` (a transformers model directory, or a peft
        adapter), plus ``value_head.safetensors``. ``state_dict``: this module's full state dict when
        gathered from shards (FSDP/ZeRO-3); by default the module's own tensors."""
        from safetensors.torch import save_file

        body = head = None
        if state_dict is not None:
            prefix = self._body + "."
            body = {k.removeprefix(prefix): v for k, v in state_dict.items() if k.startswith(prefix)}
            head = {k.removeprefix("value_head."): v for k, v in state_dict.items() if k.startswith("value_head.")}
        getattr(self, self._body).save_pretrained(path, safe_serialization=True, state_dict=body)
        head = head or self.value_head.state_dict()
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in head.items()}, str(Path(path) / "value_head.safetensors")
        )


class PolicyWithValue(_WithValueHead):
    """A causal LM plus a scalar value head on its last hidden state (shared backbone, as in
    Ziegler et al. 2019 and TRL's ``AutoModelForCausalLMWithValueHead``).

    ``forward`` returns the LM's output with an extra ``"value_preds"`` entry of shape (B, S): the
    value of the state at every position.
    """

    _body = "policy"

    def __init__(self, policy: PreTrainedModel):
        super().__init__()
        self.policy = policy
        self._add_value_head(policy.config, next(policy.parameters()).device)

    @property
    def config(self):
        return self.policy.config

    def forward(self, **kwargs):
        out = self.policy(**kwargs, output_hidden_states=True)
        h = out.hidden_states[-1]
        out["value_preds"] = self.value_head(h.to(self.value_head.weight.dtype)).squeeze(-1)
        out.hidden_states = None
        return out


class ValueModel(_WithValueHead):
    """A separate critic: a transformer backbone (a causal LM without its LM head) plus a scalar head.
    Same calling convention as :class:`PolicyWithValue` (``"value_preds"`` in the output,
    ``cache`` when ``use_cache``), with ``logits`` None: no vocabulary matmul.
    """

    _body = "backbone"

    def __init__(self, causal_lm: PreTrainedModel):
        super().__init__()
        self.backbone = causal_lm.get_decoder()  # e.g. LlamaModel; the LM head is dropped
        self._config = causal_lm.config
        self._add_value_head(causal_lm.config, next(self.backbone.parameters()).device)

    @property
    def config(self):
        return self._config

    def forward(self, logits_to_keep: int = 0, **kwargs):
        from transformers.modeling_outputs import CausalLMOutputWithPast

        out = self.backbone(**kwargs)
        h = out.last_hidden_state
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        values = self.value_head(h.to(self.value_head.weight.dtype)).squeeze(-1)
        res = CausalLMOutputWithPast(logits=None, cache=out.cache)
        res["value_preds"] = values
        return res


def bitsandbytes_config(lora) -> object | None:
    """The transformers ``BitsAndBytesConfig`` for ``model.lora.load_in_4bit/8bit``, or None.

    Raises a one-line UserError where it cannot work (no bitsandbytes, no CUDA GPU)."""
    if lora is None or not (lora.load_in_4bit or lora.load_in_8bit):
        return None
    what = "load_in_4bit" if lora.load_in_4bit else "load_in_8bit"
    if not torch.cuda.is_available():
        raise UserError(
            f"model.lora.{what} quantises the base with bitsandbytes, which needs a CUDA GPU: "
            f"remove {what} on this machine"
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UserError(f"model.lora.{what} needs bitsandbytes: pip install bitsandbytes") from None
    from transformers import BitsAndBytesConfig

    if lora.load_in_4bit:
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    return BitsAndBytesConfig(load_in_8bit=True)


def apply_lora(model: PreTrainedModel, lora, gradient_checkpointing: bool = False):
    """Wrap ``model`` with a peft LoRA adapter (only the adapter is trainable; the base is frozen).

    The same module is the reference policy under ``model.disable_adapter()``: no second copy of the
    weights. ``lora`` is a :class:`rlhf_pg.config.LoraConfig`."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model, prepare_model_for_kbit_training

    if lora.load_in_4bit or lora.load_in_8bit:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    elif gradient_checkpointing:
        model.enable_input_require_grads()  # the frozen embeddings' output must carry grad for checkpointing
    targets = lora.target_modules if lora.target_modules == "all-linear" else list(lora.target_modules)
    config = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, config)
    except ValueError as err:  # e.g. target modules not found in the model
        raise UserError(f"model.lora: {one_line(err)}") from err
