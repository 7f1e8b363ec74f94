"""Character corpora and batching.

The built-in default corpus is the King James Version of the Bible (public domain;
about 4.4 MB of English text), generated from the Debian package ``bible-kjv``
(its ``bible`` program decompresses the text shipped in ``bible-kjv-text``).
Install it with::

    apt-get install -y bible-kjv

``--data PATH`` instead takes a directory with WikiText-2 raw files
(``wiki.train.raw``, ``wiki.valid.raw``, ``wiki.test.raw``) or with ``train.txt``,
``valid.txt``, ``test.txt``, or a single text file (split like the built-in one).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

KJV_INSTALL_COMMAND = "apt-get install -y bible-kjv"
_KJV_RANGE = "gen1:1-rev22:21"  # the whole Bible; `bible` coerces references into range
_SPLIT_FILES = (
    ("wiki.train.raw", "wiki.valid.raw", "wiki.test.raw"),
    ("train.txt", "valid.txt", "test.txt"),
)


class CorpusNotFoundError(FileNotFoundError):
    """The requested corpus is not available; the message says how to get it."""


def default_cache_dir() -> str:
    return os.environ.get("BARRIER_OPS_DATA_DIR", os.path.join(os.path.expanduser("~"), ".cache", "barrier_ops"))


def kjv_text(cache_dir: Optional[str] = None) -> str:
    """The KJV text, one verse per line without verse references (cached after the first call)."""
    cache_dir = cache_dir or default_cache_dir()
    cached = os.path.join(cache_dir, "kjv.txt")
    if os.path.isfile(cached):
        with open(cached, encoding="utf-8") as f:
            return f.read()
    exe = shutil.which("bible")
    if exe is None:
        raise CorpusNotFoundError(
            "the built-in corpus (King James Bible, public domain) needs the Debian package bible-kjv: "
            f"run `{KJV_INSTALL_COMMAND}`, or pass --data PATH with WikiText-2 raw files"
        )
    # -f turns pretty-printing off: one "Book1:1 text" line per verse.
    out = subprocess.run(
        [exe, "-f", _KJV_RANGE], stdin=subprocess.DEVNULL, capture_output=True, text=True, check=True
    ).stdout
    lines = [line.split(" ", 1)[1] for line in out.splitlines() if " " in line]
    text = "\n".join(lines) + "\n"
    if len(text) < 1_000_000:
        raise CorpusNotFoundError(
            f"`bible -f {_KJV_RANGE}` produced only {len(text)} characters; reinstall with `{KJV_INSTALL_COMMAND}`"
        )
    os.makedirs(cache_dir, exist_ok=True)
    tmp = cached + f".tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, cached)  # atomic: concurrent runs never read half a file
    return text


def split_text(text: str, fractions: Sequence[float]) -> Tuple[str, str, str]:
    """Deterministic contiguous split by characters (train | val | test)."""
    total = float(sum(fractions))
    n = len(text)
    a = int(n * fractions[0] / total)
    b = int(n * (fractions[0] + fractions[1]) / total)
    return text[:a], text[a:b], text[b:]


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def load_splits(path: Optional[str] = None, fractions: Sequence[float] = (0.9, 0.05, 0.05)) -> Dict[str, str]:
    """Return {"train", "val", "test"} texts from the built-in corpus or ``path``."""
    if path is None:
        return dict(zip(("train", "val", "test"), split_text(kjv_text(), fractions)))
    if os.path.isdir(path):
        for names in _SPLIT_FILES:
            files = [os.path.join(path, n) for n in names]
            if all(os.path.isfile(f) for f in files):
                return dict(zip(("train", "val", "test"), (_read(f) for f in files)))
        expected = " or ".join("/".join(n) for n in _SPLIT_FILES)
        raise CorpusNotFoundError(f"--data {path!r}: directory has none of the expected file sets ({expected})")
    if os.path.isfile(path):
        return dict(zip(("train", "val", "test"), split_text(_read(path), fractions)))
    raise CorpusNotFoundError(f"--data {path!r}: no such file or directory")


@dataclass
class CharVocab:
    chars: List[str]

    @classmethod
    def from_texts(cls, texts: Sequence[str]) -> "CharVocab":
        return cls(sorted(set().union(*map(set, texts))))

    @property
    def size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> torch.Tensor:
        index = {c: i for i, c in enumerate(self.chars)}
        try:
            return torch.tensor([index[c] for c in text], dtype=torch.long)
        except KeyError as exc:
            raise ValueError(f"character {exc.args[0]!r} is not in the vocabulary") from None

    def decode(self, ids) -> str:
        return "".join(self.chars[i] for i in ids)


@dataclass
class CharData:
    vocab: CharVocab
    train: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor

    def split(self, name: str) -> torch.Tensor:
        return {"train": self.train, "val": self.val, "test": self.test}[name]


def build_data(splits: Dict[str, str]) -> CharData:
    vocab = CharVocab.from_texts([splits["train"], splits["val"], splits["test"]])
    return CharData(vocab, vocab.encode(splits["train"]), vocab.encode(splits["val"]), vocab.encode(splits["test"]))


def random_batch(data: torch.Tensor, batch_size: int, block_size: int, generator: torch.Generator):
    """Random windows (x, y) with y = x shifted by one; sampled on CPU with ``generator``."""
    if data.numel() <= block_size + 1:
        raise ValueError(f"split has {data.numel()} tokens, need more than block_size + 1 = {block_size + 1}")
    starts = torch.randint(0, data.numel() - block_size - 1, (batch_size,), generator=generator)
    offsets = torch.arange(block_size + 1)
    windows = data[starts[:, None] + offsets]
    return windows[:, :-1], windows[:, 1:]


def eval_batches(data: torch.Tensor, n_batches: int, batch_size: int, block_size: int):
    """Fixed, evenly spaced windows covering the split: the same for every model and call."""
    if data.numel() <= block_size + 1:
        raise ValueError(f"split has {data.numel()} tokens, need more than block_size + 1 = {block_size + 1}")
    n = n_batches * batch_size
    starts = torch.linspace(0, data.numel() - block_size - 1, n).long()
    offsets = torch.arange(block_size + 1)
    windows = data[starts[:, None] + offsets]
    for i in range(n_batches):
        w = windows[i * batch_size : (i + 1) * batch_size]
        yield w[:, :-1], w[:, 1:]
