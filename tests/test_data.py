"""Tests for data.py: tokenizer round trips and determinism, corpus order and split, shard cache, batches."""
import io
import random
import re
import site
import sys
import sysconfig
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import tiktoken
import tiktoken.load
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402

UNICODE_SAMPLES = [
    "日本語のテキストと中文字符，한국어 문장도 있습니다。",
    "emoji 🎉🚀 family 👨‍👩‍👧‍👦 flags 🇫🇷🇯🇵 skin 👍🏽 keycap 1️⃣",
    "combining: e\u0301 a\u0308 Z\u0336\u0337 n\u0303\u0323 \u0915\u094d\u0937",
    "RTL: שלום עולם, مرحبا بالعالم \u200f\u202eevil\u202c",
    "control: \x00\x01\x07\x08\x0b\x0c\x1b[31m\x1c\x1f\x7f\x85 and NUL\x00\x00 inside",
    " " * 1000 + "x" + "\t" * 300 + "\r\n" * 50 + "\n\n\n   \n\t \u3000\u00a0\u2028\u2029end",
    "digits: 1234567890 ١٢٣٤٥ ²³ ⅫⅣ ０１２ 3.14159e-10 0x7fff",
    "code: def __init__(self, x: int = 0) -> None:\n    self._x = x  # it's\n",
    "literal specials: <|bos|> <|eos|><|user|> <|not_a_special|>",
    "",
    "a",
    "\U0010ffff\U000e0001\ufeff\ufffd\ufffe",
]


def _random_unicode(n: int, seed: int) -> str:
    """Random code points from all planes, surrogates left out (they are not valid UTF-8)."""
    rng = random.Random(seed)
    chars = []
    while len(chars) < n:
        cp = rng.choice([rng.randrange(0x80), rng.randrange(0x800), rng.randrange(0x10000), rng.randrange(0x110000)])
        if not 0xD800 <= cp <= 0xDFFF:
            chars.append(chr(cp))
    return "".join(chars)


@pytest.fixture(scope="module")
def sample_texts():
    """About 200 KB: stdlib source plus multilingual text, so merges include multi-byte characters."""
    return data._training_sample(data.load_corpus(), 200_000) + UNICODE_SAMPLES * 20


@pytest.fixture(scope="module")
def enc(sample_texts):
    return data.train_tokenizer(sample_texts, 512, progress=False)


def _naive_bpe(texts, n_merges):
    """Reference BPE: recount every pair of every word before each merge."""
    counts = Counter(w for t in texts for w in re.findall(data.PAT_STR, t))
    words = {tuple(w.encode("utf-8")): c for w, c in counts.items()}
    vocab = [bytes([i]) for i in range(256)]
    ranks = {tok: i for i, tok in enumerate(vocab)}
    while len(vocab) < 256 + n_merges:
        pairs = Counter()
        for word, c in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += c
        if not pairs:
            break
        (a, b), _ = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))
        merged = vocab[a] + vocab[b]
        if merged not in ranks:
            ranks[merged] = len(vocab)
            vocab.append(merged)
        new, merged_words = ranks[merged], Counter()
        for word, c in words.items():
            out, j = [], 0
            while j < len(word):
                if j + 1 < len(word) and word[j] == a and word[j + 1] == b:
                    out.append(new)
                    j += 2
                else:
                    out.append(word[j])
                    j += 1
            merged_words[tuple(out)] += c
        words = merged_words
    return ranks


# ----------------------------------------------------------------------------- tokenizer

@pytest.mark.parametrize("text", UNICODE_SAMPLES + [_random_unicode(2000, s) for s in range(3)],
                         ids=[f"sample{i}" for i in range(len(UNICODE_SAMPLES))] + ["random0", "random1", "random2"])
def test_round_trip_any_utf8(enc, text):
    ids = enc.encode_ordinary(text)
    assert enc.decode(ids) == text
    assert enc.decode_bytes(ids) == text.encode("utf-8")
    assert enc.decode(enc.encode(text, disallowed_special=())) == text


def test_bytes_are_base_tokens_and_vocab_layout(enc):
    ranks = enc._mergeable_ranks
    assert all(ranks[bytes([i])] == i for i in range(256))
    assert sorted(ranks.values()) == list(range(len(ranks)))
    assert enc.n_vocab == 512
    assert sorted(enc._special_tokens) == sorted(data.SPECIAL_TOKENS)
    assert sorted(enc._special_tokens.values()) == list(range(len(ranks), 512))


def test_training_learns_merges(enc, sample_texts):
    text = "".join(sample_texts[:20])
    assert len(enc.encode_ordinary(text)) < 0.5 * len(text.encode("utf-8"))


def test_specials_single_ids_and_literal_text_stays_text(enc):
    for s in data.SPECIAL_TOKENS:
        (i,) = enc.encode(s, allowed_special={s})
        assert i == enc.encode_single_token(s) and i >= len(enc._mergeable_ranks)
    specials = set(enc._special_tokens.values())
    text = "x <|bos|> y <|eos|><|user|>"
    ids = enc.encode_ordinary(text)
    assert not specials.intersection(ids) and enc.decode(ids) == text
    with pytest.raises(ValueError):   # tiktoken's default: special strings in text are an error
        enc.encode(text)


def test_save_load_and_state_give_identical_encodings(enc, tmp_path, monkeypatch):
    path = tmp_path / "tok.tiktoken"
    data.save_tokenizer(enc, path)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")   # tiktoken's own loader reads our file, uncached
    assert tiktoken.load.load_tiktoken_bpe(str(path)) == enc._mergeable_ranks
    buf = io.BytesIO()
    torch.save(data.tokenizer_state(enc), buf)
    buf.seek(0)
    for other in (data.load_tokenizer(path), data.tokenizer_from_state(torch.load(buf, weights_only=True))):
        assert other._mergeable_ranks == enc._mergeable_ranks
        assert other._special_tokens == enc._special_tokens and other._pat_str == enc._pat_str
        assert data.tokenizer_hash(other) == data.tokenizer_hash(enc)
        for text in UNICODE_SAMPLES:
            assert other.encode_ordinary(text) == enc.encode_ordinary(text)


def test_load_after_overwrite_and_bad_files(enc, tmp_path):
    path = tmp_path / "tok.tiktoken"
    small = data.train_tokenizer(["hello hello world"] * 10, 270, progress=False)
    data.save_tokenizer(small, path)
    data.load_tokenizer(path)
    data.save_tokenizer(enc, path)
    assert data.load_tokenizer(path).n_vocab == enc.n_vocab
    with pytest.raises(ValueError, match="missing.tiktoken"):
        data.load_tokenizer(tmp_path / "missing.tiktoken")
    path.write_bytes(b"not base64 at all\n")
    with pytest.raises(ValueError, match="line 1"):
        data.load_tokenizer(path)
    with pytest.raises(ValueError, match="not a tokenizer state"):
        data.tokenizer_from_state({"name": "x"})


def test_training_is_deterministic_and_matches_naive_reference(sample_texts):
    texts = sample_texts[:3] + UNICODE_SAMPLES
    a = data.train_tokenizer(texts, 256 + 40 + len(data.SPECIAL_TOKENS), progress=False)
    b = data.train_tokenizer(texts, 256 + 40 + len(data.SPECIAL_TOKENS), progress=False)
    assert a._mergeable_ranks == b._mergeable_ranks
    assert a._mergeable_ranks == _naive_bpe(texts, 40)


def test_vocab_size_limits():
    with pytest.raises(ValueError, match="vocab_size=100"):
        data.train_tokenizer(["text"], 100, progress=False)
    enc = data.train_tokenizer(["ab ab"], 400, progress=False)   # runs out of pairs: smaller vocabulary
    assert enc.n_vocab < 400 and enc.decode(enc.encode_ordinary("ab ba")) == "ab ba"


# ----------------------------------------------------------------------------- corpus

def test_stdlib_corpus_sorted_without_third_party_code():
    files = data.stdlib_files()
    root = Path(sysconfig.get_paths()["stdlib"]).resolve()
    rel = [f.relative_to(root).as_posix() for f in files]
    assert rel == sorted(rel) and "os.py" in rel and "json/decoder.py" in rel
    assert all(r.endswith(".py") for r in rel)
    third_party = [Path(p).resolve() for p in site.getsitepackages() + [sysconfig.get_paths()["purelib"]]]
    for f in files:
        assert not {"site-packages", "dist-packages"} & set(f.parts), f
        assert not any(f.is_relative_to(d) for d in third_party), f
    assert data.stdlib_files() == files


def test_stdlib_files_prunes_installs_inside_the_folder(tmp_path, monkeypatch):
    for rel in ["a.py", "pkg/b.py", "site-packages/c.py", "dist-packages/d.py", "venv/e.py",
                "__pycache__/f.py", "vendor/g.py", "notes.txt"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x = 1\n")
    (tmp_path / "venv" / "pyvenv.cfg").write_text("home = /usr\n")
    monkeypatch.setattr(data, "_third_party_dirs", lambda: {(tmp_path / "vendor").resolve()})
    assert data.stdlib_files(tmp_path) == [tmp_path.resolve() / "a.py", tmp_path.resolve() / "pkg" / "b.py"]


def test_split_by_file_deterministic_disjoint_and_stable():
    corpus = data.load_corpus()
    again = data.load_corpus()
    assert corpus.train_files == again.train_files and corpus.val_files == again.val_files
    assert not set(corpus.train_files) & set(corpus.val_files)
    assert sorted(corpus.train_files + corpus.val_files) == sorted(data.stdlib_files())
    assert 0.005 < len(corpus.val_files) / len(data.stdlib_files()) < 0.05
    # a file's side depends on its path alone: dropping other files never moves it
    root = corpus.root
    subset = corpus.train_files[::3] + corpus.val_files[::2]
    train, val = data.split_by_file(sorted(subset), root, data.VAL_FRACTION)
    assert set(val) == set(corpus.val_files[::2]) and set(train) == set(corpus.train_files[::3])


def _write_user_dir(root: Path) -> dict[str, str]:
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyzé") for _ in range(rng.randint(1, 8))) for _ in range(300)]
    texts = {f"doc{i:02d}.txt": f"document {i}: <|bos|> " + " ".join(rng.choices(words, k=300)) for i in range(60)}
    texts["sub/naïve.md"] = "# Ünïcödé 日本語 🎉\n" * 30
    for rel, text in texts.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text, encoding="utf-8")
    (root / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00" + bytes(range(256)))
    (root / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    (root / ".hidden").write_text("secret")
    (root / ".git").mkdir()
    (root / ".git" / "HEAD").write_text("ref: main")
    (root / "empty.txt").write_text("")
    return texts


def test_user_directory_corpus(tmp_path):
    texts = _write_user_dir(tmp_path)
    corpus = data.load_corpus(tmp_path)
    rel = [f.relative_to(tmp_path.resolve()).as_posix() for f in corpus.train_files + corpus.val_files]
    assert sorted(rel) == sorted(texts)   # binary, non-UTF-8, hidden and empty files skipped
    assert len(corpus.val_files) >= 1 and not set(corpus.train_files) & set(corpus.val_files)
    assert list(corpus.documents("val")) == [texts[f.relative_to(tmp_path.resolve()).as_posix()]
                                             for f in corpus.val_files]


def test_single_file_splits_by_tail(tmp_path):
    path = tmp_path / "book.txt"
    text = "".join(f"line {i} ünïcode\n" for i in range(5000))
    path.write_text(text, encoding="utf-8")
    corpus = data.load_corpus(path)
    (train,), (val,) = corpus.documents("train"), corpus.documents("val")
    assert train + val == text and 0.01 < len(val) / len(text) < 0.03


def test_missing_and_empty_paths(tmp_path):
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    (tmp_path / "empty.txt").write_text("")
    binary_dir = tmp_path / "bin"
    binary_dir.mkdir()
    (binary_dir / "x.dat").write_bytes(b"\x00\xff" * 10)
    for bad, message in [(tmp_path / "nope", "nope does not exist"), ("", "empty"),
                         (empty_dir, "holds no non-empty UTF-8"), (binary_dir, "holds no non-empty UTF-8"),
                         (tmp_path / "empty.txt", "empty.txt is empty")]:
        with pytest.raises(ValueError, match=message):
            data.prepare_data(bad, vocab_size=300, cache_dir=tmp_path / "cache")
    np.save(tmp_path / "tokens.npy", np.arange(100, dtype=np.uint16))
    with pytest.raises(ValueError, match="--tokenizer"):
        data.prepare_data(tmp_path / "tokens.npy", cache_dir=tmp_path / "cache")


# ----------------------------------------------------------------------------- shards

def test_prepare_data_shards_cached_reused_and_rebuilt(tmp_path, monkeypatch):
    texts = _write_user_dir(tmp_path / "corpus")
    cache = tmp_path / "cache"
    enc, train, val = data.prepare_data(tmp_path / "corpus", vocab_size=320, cache_dir=cache,
                                        tokenizer_sample_mb=0.05)
    assert enc.n_vocab == 320 and train.dtype == np.uint16 and isinstance(train, np.memmap)
    bos = enc.encode_single_token(data.BOS)
    corpus = data.load_corpus(tmp_path / "corpus")
    for stream, split in ((train, "train"), (val, "val")):
        docs = list(corpus.documents(split))
        assert stream[0] == bos and int((np.asarray(stream) == bos).sum()) == len(docs)   # literal "<|bos|>" stays text
        starts = list(np.flatnonzero(np.asarray(stream) == bos)) + [len(stream)]
        assert [enc.decode(stream[s + 1:e].tolist()) for s, e in zip(starts, starts[1:])] == docs
    shards = sorted(cache.glob("tokens-*.bin"))
    assert len(shards) == 2 and len(list(cache.glob("tokenizer-*.tiktoken"))) == 1

    def fail(*args, **kwargs):
        raise AssertionError("re-tokenised or re-trained although nothing changed")
    with monkeypatch.context() as m:
        m.setattr(data, "_write_shard", fail)
        m.setattr(data, "train_tokenizer", fail)
        enc2, train2, val2 = data.prepare_data(tmp_path / "corpus", vocab_size=320, cache_dir=cache,
                                               tokenizer_sample_mb=0.05)
    assert np.array_equal(train2, train) and np.array_equal(val2, val)

    other = data.train_tokenizer(texts.values(), 300, progress=False)   # new tokenizer: new shards
    enc3, train3, _ = data.prepare_data(tmp_path / "corpus", cache_dir=cache, tokenizer=other)
    assert enc3 is other and len(list(cache.glob("tokens-*.bin"))) == 4
    assert enc3.decode(train3.tolist()) == enc.decode(train.tolist())
    assert not list(cache.glob(".*tmp"))   # written through a temporary file and a rename

    (tmp_path / "corpus" / "doc00.txt").write_text("changed text")   # corpus changed: new shards
    data.prepare_data(tmp_path / "corpus", cache_dir=cache, tokenizer=other)
    assert len(list(cache.glob("tokens-*.bin"))) == 6


def test_token_shard_as_data(tmp_path):
    enc = data.train_tokenizer(["hello world, hello tokens"] * 20, 300, progress=False)
    data.save_tokenizer(enc, tmp_path / "tok.tiktoken")
    tokens = np.random.default_rng(0).integers(0, enc.n_vocab, size=5000).astype(np.uint16)
    np.save(tmp_path / "t.npy", tokens)
    tokens.tofile(tmp_path / "t.bin")
    for name in ("t.npy", "t.bin"):
        enc2, train, val = data.prepare_data(tmp_path / name, tokenizer=tmp_path / "tok.tiktoken")
        assert np.array_equal(np.concatenate([train, val]), tokens) and 0 < len(val) < 0.05 * len(tokens)
    np.save(tmp_path / "bad.npy", np.array([1, 2, enc.n_vocab], dtype=np.uint16))
    with pytest.raises(ValueError, match="beyond"):
        data.prepare_data(tmp_path / "bad.npy", tokenizer=enc)
    (tmp_path / "odd.bin").write_bytes(b"\x01\x00\x02")
    with pytest.raises(ValueError, match="not a whole number"):
        data.prepare_data(tmp_path / "odd.bin", tokenizer=enc)


# ----------------------------------------------------------------------------- batches

def test_sample_batch_deterministic_per_seed_step_rank():
    tokens = np.arange(10_000, dtype=np.uint16)   # every value unique: a row shows where it came from
    x, y = data.sample_batch(tokens, 8, 64, seed=1, step=5, rank=0)
    assert x.shape == y.shape == (8, 64) and x.dtype == y.dtype == torch.int64
    assert torch.equal(y, x + 1) and torch.equal(x[:, 1:] - x[:, :-1], torch.ones(8, 63, dtype=torch.int64))
    assert int(y.max()) < len(tokens)
    again = data.sample_batch(tokens, 8, 64, seed=1, step=5, rank=0)
    assert torch.equal(again[0], x) and torch.equal(again[1], y)
    for other in [dict(seed=2, step=5, rank=0), dict(seed=1, step=6, rank=0), dict(seed=1, step=5, rank=1)]:
        assert not torch.equal(data.sample_batch(tokens, 8, 64, **other)[0], x), other
    x, y = data.sample_batch(tokens[:65], 4, 64, seed=0, step=0)   # the shortest usable stream
    assert torch.equal(x[0], torch.arange(64)) and torch.equal(y[0], torch.arange(1, 65))
    with pytest.raises(ValueError, match="seq_len"):
        data.sample_batch(tokens[:64], 4, 64, seed=0, step=0)


def test_iter_eval_batches_even_and_deterministic():
    tokens = np.arange(5000, dtype=np.uint32)
    batches = list(data.iter_eval_batches(tokens, 4, 100, max_batches=3))
    assert len(batches) == 3 and all(x.shape == (4, 100) and torch.equal(y, x + 1) for x, y in batches)
    starts = torch.cat([x[:, 0] for x, _ in batches])
    assert starts[0] == 0 and batches[-1][1][-1, -1] == len(tokens) - 1
    assert len(set(starts.tolist())) == 12 and bool((starts.diff() >= 100).all())   # spread, not overlapping
    again = list(data.iter_eval_batches(tokens, 4, 100, max_batches=3))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again))
    short = list(data.iter_eval_batches(tokens[:350], 4, 100, max_batches=10))   # fewer windows than asked
    assert sum(len(x) for x, _ in short) == 3
    with pytest.raises(ValueError, match="fewer than seq_len"):
        next(data.iter_eval_batches(tokens[:100], 4, 100, max_batches=1))


def test_command_line(tmp_path, capsys):
    _write_user_dir(tmp_path / "corpus")
    data.main(["shards", "--data", str(tmp_path / "corpus"), "--vocab-size", "300", "--sample-mb", "0.05",
               "--cache-dir", str(tmp_path / "cache")])
    assert "tokenizer: 300 tokens; train" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        data.main(["corpus", "--data", str(tmp_path / "missing")])
    assert exit_info.value.code == 2 and "missing does not exist" in capsys.readouterr().err
