"""Telling a filesystem path from a Hugging Face hub id in a user-given name.

Model and dataset names are either a local path or a hub id (``name`` or ``org/name``). A name
that is meant as a path but does not exist should be reported as a missing path, not sent to the
hub; :func:`looks_like_path` is that one rule, shared by model resolution and dataset loading.
"""

from __future__ import annotations

PATH_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".safetensors", ".gguf")
"""File suffixes that mark a name as a file: the data formats rlhf-pg reads and model weight files.
Hub ids do not end in them."""


def looks_like_path(name: str) -> bool:
    """Whether ``name`` is meant as a filesystem path rather than a hub id.

    A path starts with ``.``, ``/`` or ``~``, contains a backslash, has more than one ``/`` (hub ids
    have at most one: ``org/name``; ``runs/x/final`` is a path) or ends in one of
    :data:`PATH_SUFFIXES` (``data/train.jsonl``). ``org/name`` and ``gpt2`` are hub ids.
    """
    if name.startswith((".", "/", "~")) or "\\" in name:
        return True
    return name.count("/") > 1 or name.lower().endswith(PATH_SUFFIXES)
