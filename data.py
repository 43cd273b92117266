r"""Data: the corpus, a byte-level BPE tokenizer trained here, token shards on disk, and batches.

V4 itself is pre-trained on 32T+ tokens with a 128K-entry byte-level BPE vocabulary (`vocab_size` =
129280 in the official config). nanov4 keeps the same shape of pipeline at a size one machine handles:

    text --(regex pre-split, byte-level BPE)--> token ids --(uint16/uint32 memmap)--> random windows

Corpus. With no `--data`, the corpus is the `.py` source of the Python standard library of the running
interpreter (about 31 MB with its tests): real text that exists on every machine that runs the project.
Installed third-party code is left out (`site-packages`, `dist-packages`, the site and purelib/platlib
folders, any virtual environment), since some installs keep it inside the standard library folder.
Files are read in sorted order of their relative path; stdlib files that are not valid UTF-8 (a few
test fixtures) are decoded with errors="replace". User data (`--data PATH`) is one of:
  * a text file: decoded with errors="replace"; its last `val_fraction` of characters is validation;
  * a directory: every file below it (hidden files and folders skipped) whose first 8 KB has no NUL
    byte and decodes as UTF-8, in sorted order; the validation split is by file, as for the stdlib;
  * a token shard `.npy` (uint16/uint32) or `.bin` (raw, uint16 when the tokenizer has at most 65536
    tokens, else uint32): its last `val_fraction` of tokens is validation; it needs `--tokenizer`.
The validation split BY FILE puts a file in validation when a hash of its relative path falls below
`val_fraction`: the choice depends on nothing else, so adding a file never moves another one.

Token stream. Every document is preceded by `<|bos|>`. There is no document masking (V4 masks
attention and aligns compressor blocks per document; we do not, see DESIGN.md): a batch is a set of
random windows of the stream, and the model learns from `<|bos|>` that a new document starts.
Documents are encoded with `encode_ordinary`, so text that literally contains "<|bos|>" stays plain
text (several ordinary tokens); specials enter the stream only where this code inserts their ids.
Callers who want specials parsed from text must say so: `enc.encode(s, allowed_special={"<|user|>"})`.

Tokenizer. GPT-4-style pre-split, written for Python's `re` (no `regex` module): `[^\W\d_]` stands for
`\p{L}` and `\d` for `\p{N}`. tiktoken compiles the same pattern in Rust, where `\w` also counts
combining marks and `\s` leaves out \x1c-\x1f: the split at run time can differ from training on
such characters, which costs a little compression and never correctness (all 256 bytes are tokens, so
any string round-trips). Training counts the pre-split chunks ("words"), then merges the most frequent
adjacent pair over the unique words, with an incremental index (pair -> count, pair -> word ids) and a
heap with lazy deletion; ties go to the smaller pair of ids, so training is deterministic. A merge
whose bytes already exist as a token reuses that token (tiktoken ranks are keyed by bytes).
Ids: 0..255 the bytes, then the merges in order (the tiktoken rank is the merge priority), then the
specials. Saved as tiktoken's own `.tiktoken` file (base64 token, space, rank per line) plus
`<path>.json` beside it with the name, the pattern and the specials.
"""
import argparse
import base64
import codecs
import hashlib
import heapq
import itertools
import json
import os
import re
import site
import sys
import sysconfig
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import tiktoken
import torch
from tqdm import tqdm

PAT_STR = (
    r"'(?i:[sdmt]|ll|ve|re)"          # English contractions
    r"|(?:[^\r\n\w]|_)?[^\W\d_]+"     # a word, with at most one leading space, symbol or underscore
    r"|\d{1,3}"                       # digits, in groups of at most three
    r"| ?(?:[^\s\w]|_)+[\r\n]*"       # a run of symbols (and underscores), with the newlines after it
    r"|\s*[\r\n]"                     # blank space up to and including a newline
    r"|\s+(?!\S)"                     # blank space, leaving the last space to the word after it
    r"|\s+"
)
BOS, EOS = "<|bos|>", "<|eos|>"
# <|bos|> separates documents; the rest are reserved now for chat and tool turns later.
SPECIAL_TOKENS = [BOS, EOS, "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>",
                  "<|tool_call|>", "<|tool_result|>"]
VAL_FRACTION = 0.02
SHARD_SUFFIXES = (".bin", ".npy")
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}


# ----------------------------------------------------------------------------- corpus

@dataclass
class Corpus:
    """Where the text comes from and how it splits; documents are read lazily, in order."""
    description: str
    root: Path
    train_files: list[Path]
    val_files: list[Path]
    tail_split: bool = False  # True: one file whose last val_fraction of text is validation
    val_fraction: float = VAL_FRACTION

    def documents(self, split: str) -> Iterator[str]:
        """The documents of 'train' or 'val', one string each, in corpus order."""
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        if self.tail_split:
            text = _read_text(self.train_files[0])
            cut = len(text) - int(len(text) * self.val_fraction)
            yield text[:cut] if split == "train" else text[cut:]
            return
        for path in self.train_files if split == "train" else self.val_files:
            yield _read_text(path)

    def fingerprint(self) -> str:
        """Hash of the file list, sizes and modification times and the split: a cache key."""
        h = hashlib.sha256(f"{self.root}|{self.tail_split}|{self.val_fraction}".encode())
        for split, files in (("train", self.train_files), ("val", self.val_files)):
            for path in files:
                st = path.stat()
                h.update(f"{split}|{path.relative_to(self.root)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        return h.hexdigest()


def _read_text(path: Path) -> str:
    return path.read_bytes().decode("utf-8", errors="replace")


def _hash_fraction(relpath: str) -> float:
    """A number in [0, 1) fixed by the relative path alone."""
    return int.from_bytes(hashlib.sha256(relpath.encode()).digest()[:8], "big") / 2.0**64


def split_by_file(files: list[Path], root: Path, val_fraction: float) -> tuple[list[Path], list[Path]]:
    """Validation = files whose path hash is below val_fraction; at least one file on each side."""
    if len(files) < 2:
        raise ValueError(f"a split by file needs at least 2 files under {root}, found {len(files)}")
    frac = {f: _hash_fraction(f.relative_to(root).as_posix()) for f in files}
    val = {f for f in files if frac[f] < val_fraction} or {min(files, key=frac.get)}
    if len(val) == len(files):
        val.discard(max(files, key=frac.get))
    return [f for f in files if f not in val], [f for f in files if f in val]


def _third_party_dirs() -> set[Path]:
    """Folders that hold installed third-party code, wherever the install put them."""
    dirs = [sysconfig.get_paths().get(k) for k in ("purelib", "platlib")]
    dirs += list(getattr(site, "getsitepackages", lambda: [])())
    dirs.append(getattr(site, "getusersitepackages", lambda: None)())
    return {Path(d).resolve() for d in dirs if d}


def stdlib_files(root: str | Path | None = None) -> list[Path]:
    """The standard library's `.py` files, sorted by relative path, without third-party code."""
    root = Path(root or sysconfig.get_paths()["stdlib"]).resolve()
    excluded = _third_party_dirs()
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS and (here / d).resolve() not in excluded
                       and not (here / d / "pyvenv.cfg").exists()]
        files += [here / f for f in filenames if f.endswith(".py")]
    return sorted(files, key=lambda f: f.relative_to(root).as_posix())


def _is_text_file(path: Path) -> bool:
    """Sniff the first 8 KB: no NUL byte, and valid UTF-8 (a character cut at the end is fine)."""
    with open(path, "rb") as f:
        head = f.read(8192)
    if b"\0" in head:
        return False
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError:
        return False
    return True


def load_corpus(data: str | Path | None = None, val_fraction: float = VAL_FRACTION) -> Corpus:
    """The default corpus (data=None), a text file or a directory of text files."""
    if data is None:
        root = Path(sysconfig.get_paths()["stdlib"]).resolve()
        train, val = split_by_file(stdlib_files(root), root, val_fraction)
        return Corpus(f"python{sys.version_info[0]}.{sys.version_info[1]}-stdlib", root, train, val,
                      val_fraction=val_fraction)
    path = _check_data_path(data)
    if path.is_file() and path.suffix in SHARD_SUFFIXES:
        raise ValueError(f"data {path} is a token shard, not text: it has no corpus to list or to train a "
                         f"tokenizer on (prepare_data and `python data.py shards --tokenizer T` read it)")
    if path.is_file():
        if path.stat().st_size == 0:
            raise ValueError(f"data file {path} is empty")
        return Corpus(f"file:{path.name}", path.parent, [path], [path], tail_split=True,
                      val_fraction=val_fraction)
    files = []
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        files += [Path(dirpath) / f for f in filenames if not f.startswith(".")]
    files = sorted((f for f in files if f.stat().st_size > 0 and _is_text_file(f)),
                   key=lambda f: f.relative_to(path).as_posix())
    if not files:
        raise ValueError(f"data directory {path} holds no non-empty UTF-8 text file")
    if len(files) == 1:
        return load_corpus(files[0], val_fraction)
    train, val = split_by_file(files, path, val_fraction)
    return Corpus(f"dir:{path.name}", path, train, val, val_fraction=val_fraction)


def _check_data_path(data: str | Path) -> Path:
    if str(data).strip() == "":
        raise ValueError("data path is empty: pass a text file, a directory or a token shard")
    path = Path(data).expanduser().resolve()
    if not path.exists():
        raise ValueError(f"data path {data} does not exist")
    return path


# ----------------------------------------------------------------------------- tokenizer

def train_tokenizer(texts: Iterable[str], vocab_size: int, *, special_tokens: list[str] = SPECIAL_TOKENS,
                    pat_str: str = PAT_STR, name: str = "nanov4-bpe", progress: bool = True) -> tiktoken.Encoding:
    """Byte-level BPE: 256 byte tokens, vocab_size - 256 - len(special_tokens) merges, then specials.

    If the text runs out of pairs to merge first, the vocabulary comes out smaller (with a warning):
    size the model by `enc.n_vocab`, not by the request.
    """
    n_merges = vocab_size - 256 - len(special_tokens)
    if n_merges < 0:
        raise ValueError(f"vocab_size={vocab_size} must be at least {256 + len(special_tokens)} "
                         f"(256 bytes + {len(special_tokens)} special tokens)")
    pattern = re.compile(pat_str)
    counts = Counter()
    for text in tqdm(texts, desc="tokenizer: counting words", unit="doc", disable=not progress):
        counts.update(pattern.findall(text))
    words = [list(w.encode("utf-8")) for w in counts]   # each word as its current token ids
    freq = list(counts.values())

    stats = defaultdict(int)   # pair -> occurrences, weighted by word frequency
    where = defaultdict(set)   # pair -> ids of the words that contain it
    for i, word in enumerate(words):
        for pair in zip(word, word[1:]):
            stats[pair] += freq[i]
            where[pair].add(i)
    heap = [(-c, a, b) for (a, b), c in stats.items()]   # max count first, then the smaller pair
    heapq.heapify(heap)

    vocab = [bytes([i]) for i in range(256)]
    ranks = {tok: i for i, tok in enumerate(vocab)}
    bar = tqdm(total=n_merges, desc="tokenizer: merges", unit="merge", disable=not progress)
    while len(vocab) < 256 + n_merges and heap:
        neg, a, b = heapq.heappop(heap)
        count = stats.get((a, b), 0)
        if count != -neg:   # stale entry: the count fell since it was pushed
            if count > 0:
                heapq.heappush(heap, (-count, a, b))
            continue
        merged = vocab[a] + vocab[b]
        new = ranks.get(merged)   # tiktoken keys ranks by bytes: a second pair spelling them reuses the id
        if new is None:
            new = ranks[merged] = len(vocab)
            vocab.append(merged)
            bar.update()
        delta = defaultdict(int)
        for i in where.pop((a, b)):
            old, word, j = words[i], [], 0
            while j < len(old):
                if j + 1 < len(old) and old[j] == a and old[j + 1] == b:
                    word.append(new)
                    j += 2
                else:
                    word.append(old[j])
                    j += 1
            words[i] = word
            old_pairs, new_pairs = list(zip(old, old[1:])), list(zip(word, word[1:]))
            for pair in old_pairs:
                delta[pair] -= freq[i]
            for pair in new_pairs:
                delta[pair] += freq[i]
            for pair in set(old_pairs).difference(new_pairs):
                if pair in where:
                    where[pair].discard(i)
            for pair in new_pairs:
                where[pair].add(i)
        for pair, d in delta.items():
            stats[pair] += d
            if stats[pair] <= 0:
                del stats[pair]
                where.pop(pair, None)
            elif d > 0:
                heapq.heappush(heap, (-stats[pair], *pair))
    bar.close()
    if len(vocab) < 256 + n_merges:
        tqdm.write(f"warning: the text allows only {len(vocab) - 256} merges; "
                   f"vocabulary is {len(vocab) + len(special_tokens)} instead of {vocab_size}")
    specials = {s: len(vocab) + k for k, s in enumerate(special_tokens)}
    return tiktoken.Encoding(name, pat_str=pat_str, mergeable_ranks=ranks, special_tokens=specials)


def tokenizer_state(enc: tiktoken.Encoding) -> dict:
    """A plain dict (str, int, bytes, list) to store in a checkpoint; torch.load(weights_only=True) reads it."""
    tokens = sorted(enc._mergeable_ranks, key=enc._mergeable_ranks.get)
    return {"name": enc.name, "pat_str": enc._pat_str, "mergeable_tokens": tokens,
            "special_tokens": dict(enc._special_tokens)}


def tokenizer_from_state(state: dict) -> tiktoken.Encoding:
    """Inverse of tokenizer_state: the rank of a token is its index in `mergeable_tokens`."""
    try:
        ranks = {tok: i for i, tok in enumerate(state["mergeable_tokens"])}
        return tiktoken.Encoding(state["name"], pat_str=state["pat_str"], mergeable_ranks=ranks,
                                 special_tokens=dict(state["special_tokens"]))
    except (KeyError, TypeError) as e:
        raise ValueError(f"not a tokenizer state (missing or bad field: {e})") from e


def tokenizer_hash(enc: tiktoken.Encoding) -> str:
    state = tokenizer_state(enc)
    h = hashlib.sha256(json.dumps([state["pat_str"], state["special_tokens"]]).encode())
    for tok in state["mergeable_tokens"]:
        h.update(base64.b64encode(tok) + b"\n")
    return h.hexdigest()


def save_tokenizer(enc: tiktoken.Encoding, path: str | Path) -> None:
    """Write `path` (tiktoken's format, readable by tiktoken.load.load_tiktoken_bpe) and `path`.json."""
    path = Path(path)
    state = tokenizer_state(enc)
    ranks = b"".join(base64.b64encode(tok) + b" %d\n" % i for i, tok in enumerate(state["mergeable_tokens"]))
    meta = {"name": state["name"], "pat_str": state["pat_str"], "special_tokens": state["special_tokens"],
            "n_vocab": enc.n_vocab}
    _atomic_write(path, ranks)
    _atomic_write(Path(f"{path}.json"), json.dumps(meta, indent=1).encode())


def load_tokenizer(path: str | Path) -> tiktoken.Encoding:
    """Read what save_tokenizer wrote. The ranks are parsed here: tiktoken's own loader caches files
    by path in a temporary folder, so it would return a stale tokenizer after the file changed."""
    path = Path(path)
    meta_path = Path(f"{path}.json")
    for p in (path, meta_path):
        if not p.is_file():
            raise ValueError(f"tokenizer file {p} does not exist (save_tokenizer writes both {path.name} "
                             f"and {meta_path.name})")
    tokens = []
    for n, line in enumerate(path.read_bytes().splitlines()):
        try:
            tok, rank = line.split()
            tokens.append(base64.b64decode(tok, validate=True))
            rank = int(rank)
        except ValueError as e:
            raise ValueError(f"tokenizer file {path}, line {n + 1}: expected 'base64 rank', got {line[:60]!r}") from e
        if rank != n:
            raise ValueError(f"tokenizer file {path}, line {n + 1}: rank {rank}, expected {n}")
    try:
        meta = json.loads(meta_path.read_text())
    except ValueError as e:
        raise ValueError(f"tokenizer file {meta_path} is not valid JSON: {e}") from e
    return tokenizer_from_state({**meta, "mergeable_tokens": tokens})


def _training_sample(corpus: Corpus, sample_bytes: int) -> list[str]:
    """About sample_bytes of training text: whole files in path-hash order (a mix of the corpus, not
    its alphabetical start), the last one cut; a single file gives its first sample_bytes."""
    if corpus.tail_split:
        return [next(corpus.documents("train"))[:sample_bytes]]
    order = sorted(corpus.train_files, key=lambda f: _hash_fraction(f.relative_to(corpus.root).as_posix()))
    texts, total = [], 0
    for path in order:
        text = _read_text(path)
        texts.append(text[:sample_bytes - total])
        total += len(texts[-1].encode("utf-8"))
        if total >= sample_bytes:
            break
    return texts


# ----------------------------------------------------------------------------- token shards

def _tmp_path(path: Path) -> Path:
    """A hidden file beside `path`, unique to this process: written fully, then renamed onto `path`,
    so a crash never leaves a half-written file and ranks writing the same file do not collide."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = _tmp_path(path)
    tmp.write_bytes(data)
    os.replace(tmp, path)


def token_dtype(n_vocab: int) -> np.dtype:
    return np.dtype(np.uint16 if n_vocab <= 65536 else np.uint32)


def _write_shard(enc: tiktoken.Encoding, documents: Iterator[str], path: Path, desc: str) -> None:
    """Encode documents in batches (tiktoken threads), `<|bos|>` before each, into a raw token file."""
    dtype, bos = token_dtype(enc.n_vocab), enc.encode_single_token(BOS)
    tmp = _tmp_path(path)
    bar = tqdm(desc=desc, unit="char", unit_scale=True)
    with open(tmp, "wb") as f:
        batch, size = [], 0
        for text in itertools.chain(documents, [None]):   # None flushes the last batch
            if text is not None:
                batch.append(text)
                size += len(text)
            if batch and (text is None or size >= 8 << 20 or len(batch) >= 1024):
                for ids in enc.encode_ordinary_batch(batch, num_threads=min(8, os.cpu_count() or 1)):
                    np.array([bos], dtype=dtype).tofile(f)
                    np.array(ids, dtype=dtype).tofile(f)
                bar.update(size)
                batch, size = [], 0
    bar.close()
    os.replace(tmp, path)


def _open_shard(path: Path, dtype: np.dtype) -> np.ndarray:
    if path.stat().st_size == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


def _load_token_file(path: Path, enc: tiktoken.Encoding, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """An already tokenised shard: the last val_fraction of its tokens is validation."""
    if path.suffix == ".npy":
        tokens = np.load(path, mmap_mode="r")
        if tokens.ndim != 1 or tokens.dtype not in (np.uint16, np.uint32):
            raise ValueError(f"token shard {path} must be 1-D uint16 or uint32, got {tokens.dtype} {tokens.shape}")
    else:
        dtype = token_dtype(enc.n_vocab)
        if path.stat().st_size % dtype.itemsize:
            raise ValueError(f"token shard {path}: {path.stat().st_size} bytes is not a whole number of "
                             f"{dtype} tokens (the dtype follows the tokenizer's {enc.n_vocab} tokens)")
        tokens = _open_shard(path, dtype)
    if len(tokens) < 2:
        raise ValueError(f"token shard {path} holds {len(tokens)} tokens; it needs at least 2")
    top = int(tokens.max())
    if top >= enc.n_vocab:
        raise ValueError(f"token shard {path} holds token id {top}, beyond the tokenizer's {enc.n_vocab} tokens")
    cut = len(tokens) - max(1, int(len(tokens) * val_fraction))
    return tokens[:cut], tokens[cut:]


def prepare_data(data: str | Path | None = None, vocab_size: int = 4096, cache_dir: str | Path = "cache",
                 tokenizer: tiktoken.Encoding | str | Path | None = None, tokenizer_sample_mb: float = 4,
                 val_fraction: float = VAL_FRACTION) -> tuple[tiktoken.Encoding, np.ndarray, np.ndarray]:
    """The one call train.py makes: (tokenizer, train tokens, validation tokens), both token streams
    read-only memmaps. data=None: the standard library corpus. tokenizer: an Encoding or a saved path;
    else one is trained on tokenizer_sample_mb MB of the training split and cached, keyed by (corpus
    fingerprint, vocab_size, sample size); vocab_size only matters then. Shards are cached, keyed by
    the corpus fingerprint and the tokenizer's hash."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if tokenizer_sample_mb <= 0:
        raise ValueError(f"tokenizer_sample_mb must be positive, got {tokenizer_sample_mb}")
    cache_dir = Path(cache_dir)
    if isinstance(tokenizer, (str, Path)):
        tokenizer = load_tokenizer(tokenizer)
    shard = None if data is None else _check_data_path(data)
    if shard is not None and shard.is_file() and shard.suffix in SHARD_SUFFIXES:
        if tokenizer is None:
            raise ValueError(f"data {data} is already tokenised: pass the tokenizer that made it (--tokenizer PATH)")
        return (tokenizer, *_load_token_file(shard, tokenizer, val_fraction))

    corpus = load_corpus(data, val_fraction)
    fingerprint = corpus.fingerprint()
    if tokenizer is None:
        key = hashlib.sha256(f"{fingerprint}|{PAT_STR}|{SPECIAL_TOKENS}".encode()).hexdigest()[:16]
        tok_path = cache_dir / f"tokenizer-{key}-v{vocab_size}-s{tokenizer_sample_mb:g}mb.tiktoken"
        if tok_path.is_file() and Path(f"{tok_path}.json").is_file():
            tokenizer = load_tokenizer(tok_path)
        else:
            sample = _training_sample(corpus, int(tokenizer_sample_mb * 2**20))
            tokenizer = train_tokenizer(sample, vocab_size)
            save_tokenizer(tokenizer, tok_path)
    streams = []
    for split in ("train", "val"):
        path = cache_dir / f"tokens-{fingerprint[:16]}-{tokenizer_hash(tokenizer)[:16]}-{split}.bin"
        if not path.is_file():
            _write_shard(tokenizer, corpus.documents(split), path, f"tokenising {corpus.description} {split}")
        streams.append(_open_shard(path, token_dtype(tokenizer.n_vocab)))
    return tokenizer, streams[0], streams[1]


# ----------------------------------------------------------------------------- batches

def _check_stream(tokens: np.ndarray, seq_len: int, batch_size: int) -> None:
    if seq_len < 1 or batch_size < 1:
        raise ValueError(f"seq_len and batch_size must be positive, got seq_len={seq_len}, batch_size={batch_size}")
    if len(tokens) < seq_len + 1:
        raise ValueError(f"token stream has {len(tokens)} tokens, fewer than seq_len + 1 = {seq_len + 1}: "
                         f"use a shorter --seq-len or more data")


def sample_batch(tokens: np.ndarray, batch_size: int, seq_len: int, seed: int, step: int,
                 rank: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows of the stream: x [B, T] and y = x shifted by one, int64.

    Sequence j of a step's global batch starts at a position drawn from (seed, step, j) alone, and
    rank r takes sequences r*B .. r*B+B-1. So a resumed run draws the same batches as an
    uninterrupted one, every data-parallel rank draws different ones, and N ranks of B sequences
    read exactly what one process of N*B sequences reads (the FSDP == one-process test relies on it)."""
    _check_stream(tokens, seq_len, batch_size)
    if min(seed, step, rank) < 0:
        raise ValueError(f"seed, step and rank must be >= 0, got {seed}, {step}, {rank}")
    first = rank * batch_size
    starts = [np.random.default_rng([seed, step, j]).integers(0, len(tokens) - seq_len)
              for j in range(first, first + batch_size)]                # start + seq_len + 1 <= len
    windows = torch.from_numpy(np.stack([tokens[s:s + seq_len + 1] for s in starts]).astype(np.int64))  # [B, T+1]
    return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()   # [B, T], [B, T]


def iter_eval_batches(tokens: np.ndarray, batch_size: int, seq_len: int,
                      max_batches: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Evenly spaced windows over the whole stream (non-overlapping when it is long enough), so a
    validation loss is the same number every time; the last batch may be smaller."""
    _check_stream(tokens, seq_len, batch_size)
    n = min(max_batches * batch_size, max(1, (len(tokens) - 1) // seq_len))
    starts = np.linspace(0, len(tokens) - seq_len - 1, n).round().astype(np.int64)
    for i in range(0, n, batch_size):
        windows = torch.from_numpy(np.stack([tokens[s:s + seq_len + 1] for s in starts[i:i + batch_size]])
                                   .astype(np.int64))   # [b, T+1]
        yield windows[:, :-1].contiguous(), windows[:, 1:].contiguous()


# ----------------------------------------------------------------------------- command line

def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python data.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Inspect the corpus, train a tokenizer, build the token shards train.py uses.",
        epilog="examples:\n"
               "  python data.py corpus                              # the default corpus: files and split\n"
               "  python data.py tokenizer --vocab-size 8192 --sample-mb 20 --out tok.tiktoken\n"
               "  python data.py shards --data my_texts/ --vocab-size 4096\n"
               "  python data.py encode --tokenizer tok.tiktoken --text 'def f(x): return x'\n"
               "--data is a text file, a directory of text files (all UTF-8 files below it) or a token\n"
               "shard (.npy or .bin with --tokenizer); without it, the Python standard library's source.")
    sub = parser.add_subparsers(dest="command", required=True)
    data_help = "text file, directory of text files, or token shard (.npy/.bin); default: the stdlib source"
    p = sub.add_parser("corpus", help="list the corpus files and the train/validation split")
    p.add_argument("--data", default=None, help=data_help)
    p = sub.add_parser("tokenizer", help="train a tokenizer on a sample of the corpus, print the time taken")
    p.add_argument("--data", default=None, help=data_help)
    p.add_argument("--vocab-size", type=int, default=4096, help="tokens in total, special tokens included (default %(default)s)")
    p.add_argument("--sample-mb", type=float, default=4, help="MB of training text to learn the merges from (default %(default)s)")
    p.add_argument("--out", default=None, help="save to this .tiktoken path (and PATH.json beside it)")
    p = sub.add_parser("shards", help="tokenise the corpus into cached shards, as train.py does")
    p.add_argument("--data", default=None, help=data_help)
    p.add_argument("--vocab-size", type=int, default=4096, help="tokens in total of the tokenizer trained when --tokenizer is not given (default %(default)s)")
    p.add_argument("--tokenizer", default=None, help="a saved .tiktoken file instead of training one")
    p.add_argument("--sample-mb", type=float, default=4, help="MB of text to train that tokenizer on (default %(default)s)")
    p.add_argument("--cache-dir", default="cache", help="where tokenizers and shards are cached (default %(default)s)")
    p = sub.add_parser("encode", help="show how a saved tokenizer splits a text")
    p.add_argument("--tokenizer", required=True, help="a saved .tiktoken file")
    p.add_argument("--text", required=True, help="the text to encode")
    args = parser.parse_args(argv)
    try:
        _run_command(args)
    except ValueError as e:
        parser.exit(2, f"error: {e}\n")


def _run_command(args: argparse.Namespace) -> None:
    if args.command == "corpus":
        corpus = load_corpus(args.data)
        for split, files in (("train", corpus.train_files), ("val", corpus.val_files)):
            size = sum(f.stat().st_size for f in files)
            print(f"{split}: {len(files)} files, {size / 2**20:.1f} MB")
        print("validation files:", *(f.relative_to(corpus.root).as_posix() for f in corpus.val_files[:20]))
    elif args.command == "tokenizer":
        corpus = load_corpus(args.data)
        sample = _training_sample(corpus, int(args.sample_mb * 2**20))
        n_bytes = sum(len(t.encode("utf-8")) for t in sample)
        t0 = time.perf_counter()
        enc = train_tokenizer(sample, args.vocab_size)
        seconds = time.perf_counter() - t0
        n_tokens = sum(len(ids) for ids in enc.encode_ordinary_batch(sample))
        print(f"trained {enc.n_vocab} tokens on {n_bytes / 2**20:.1f} MB of {corpus.description} "
              f"in {seconds:.1f} s; {n_bytes / n_tokens:.2f} bytes/token on that sample")
        if args.out:
            save_tokenizer(enc, args.out)
            print(f"saved {args.out} and {args.out}.json")
    elif args.command == "shards":
        enc, train, val = prepare_data(args.data, args.vocab_size, args.cache_dir, args.tokenizer, args.sample_mb)
        print(f"tokenizer: {enc.n_vocab} tokens; train {len(train):,} tokens, val {len(val):,} tokens "
              f"({train.dtype}); cached in {args.cache_dir}/")
    elif args.command == "encode":
        enc = load_tokenizer(args.tokenizer)
        ids = enc.encode_ordinary(args.text)
        print(f"{len(ids)} tokens: {ids}")
        print(" | ".join(enc.decode_single_token_bytes(i).decode("utf-8", errors="replace") for i in ids))


if __name__ == "__main__":
    main()
