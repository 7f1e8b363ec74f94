"""A tiny in-repo training text and byte-level ids (no tokenizer, no downloads)."""

from __future__ import annotations

import os

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def training_text() -> str:
    """The project's own docs: a few tens of KB of English, always present in the repo."""
    parts = []
    path = os.path.join(ROOT, "docs")
    if os.path.isdir(path):
        for name in sorted(os.listdir(path)):
            if name.endswith(".md"):
                with open(os.path.join(path, name), encoding="utf-8") as f:
                    parts.append(f.read())
    text = "\n\n".join(parts)
    if len(text) < 4096:  # fall back to this package's sources
        with open(os.path.join(ROOT, "barrier_ops", "ops.py"), encoding="utf-8") as f:
            text += f.read()
    return text


def byte_ids(text: str) -> torch.Tensor:
    """UTF-8 bytes as token ids in [0, 256)."""
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
