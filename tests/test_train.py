"""train.py and sample.py end to end on a tiny corpus: checkpoints, resume, errors, sampling."""

import json
import os
import sysconfig

import pytest
import torch

import sample
import train


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """About 150 KB of real Python source from the standard library, as one text file."""
    root = sysconfig.get_paths()["stdlib"]
    text = "".join(open(os.path.join(root, f), encoding="utf-8").read()
                   for f in ("argparse.py", "textwrap.py", "fnmatch.py"))
    path = tmp_path_factory.mktemp("corpus") / "code.txt"
    path.write_text(text, encoding="utf-8")
    return str(path)


def run(tmp, corpus, *extra, steps=6):
    argv = ["--data", corpus, "--vocab-size", "320", "--steps", str(steps), "--batch-size", "2",
            "--seq-len", "64", "--out-dir", str(tmp / "out"), "--cache-dir", str(tmp / "cache"),
            "--eval-interval", "3", "--eval-batches", "2", "--log-interval", "1", "--ckpt-interval", "100",
            "--warmup-steps", "2", "--set", "max_seq_len=128", *extra]
    train.main(argv)
    rows = [json.loads(line) for line in open(tmp / "out" / "metrics.jsonl")]
    return [r["loss"] for r in rows if "loss" in r], rows


def test_train_checkpoint_and_sample(tmp_path, corpus, capsys):
    losses, rows = run(tmp_path, corpus)
    assert len(losses) == 6 and all(map(lambda v: v == v, losses))
    assert any("val_loss" in r for r in rows)
    state = train.load_checkpoint(str(tmp_path / "out" / "ckpt.pt"))
    model, enc = train.model_from_checkpoint(state)
    assert state["step"] == 6 and state["args"]["optimizer"] == "muon"
    # the MoE biases moved away from their zero initialisation
    assert any(m.gate.bias.abs().sum() > 0 for m in model.moe_layers() if hasattr(m.gate, "bias"))
    # a reload gives identical logits
    again, _ = train.model_from_checkpoint(train.load_checkpoint(str(tmp_path / "out" / "ckpt.pt")))
    x = torch.tensor([enc.encode_ordinary("def main(argv=None):\n    parser = ")])
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), again.eval()(x), rtol=0, atol=0)
    # temperature 0 is deterministic, and sampling with a seed repeats itself
    a, _ = sample.generate(model, x, 12, temperature=0.0)
    b, _ = sample.generate(model, x, 12, temperature=0.0)
    c, _ = sample.generate(model, x, 12, temperature=1.0, top_p=0.9, seed=3)
    d, _ = sample.generate(model, x, 12, temperature=1.0, top_p=0.9, seed=3)
    assert torch.equal(a, b) and torch.equal(c, d)
    sample.main(["--ckpt", str(tmp_path / "out" / "ckpt.pt"), "--prompt", "import os", "--max-new-tokens", "5"])
    assert "import os" in capsys.readouterr().out
    # a model trained without the FP8 indexer samples with it (its cached indexer keys in e4m3)
    sample.main(["--ckpt", str(tmp_path / "out" / "ckpt.pt"), "--prompt", "import os", "--max-new-tokens", "5",
                 "--index-fp8"])
    assert "import os" in capsys.readouterr().out


def test_resume_continues_exactly(tmp_path, corpus):
    full, _ = run(tmp_path / "a", corpus)
    first, _ = run(tmp_path / "b", corpus, "--stop-at", "3")
    both, _ = run(tmp_path / "b", corpus, "--resume")      # the log holds both segments
    assert len(first) == 3 and both == full, (full, both)


def test_resume_refuses_other_config(tmp_path, corpus):
    run(tmp_path, corpus, "--stop-at", "2")
    with pytest.raises(SystemExit, match="seq_len"):
        run(tmp_path, corpus, "--resume", "--seq-len", "32")


def test_bad_inputs(tmp_path, corpus):
    with pytest.raises(SystemExit, match="nonexistent"):
        train.main(["--data", str(tmp_path / "nonexistent"), "--out-dir", str(tmp_path / "o")])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit, match="empty"):
        train.main(["--data", str(empty), "--out-dir", str(tmp_path / "o")])
    with pytest.raises(SystemExit):
        train.parse_args(["--preset", "huge"])
    with pytest.raises(SystemExit, match="n_layers"):
        run(tmp_path, corpus, "--set", "n_layers=0")
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train.load_checkpoint(str(tmp_path / "missing.pt"))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="corrupt"):
        train.load_checkpoint(str(bad))


def test_prompt_too_long(tmp_path, corpus):
    run(tmp_path, corpus, steps=1)
    with pytest.raises(SystemExit, match="max_seq_len"):
        sample.main(["--ckpt", str(tmp_path / "out" / "ckpt.pt"), "--prompt", "x = 1\n" * 200])
    # --max-seq-len raises the limit of a model trained at 128 positions: the same prompt now samples
    sample.main(["--ckpt", str(tmp_path / "out" / "ckpt.pt"), "--prompt", "x = 1\n" * 200,
                 "--max-new-tokens", "3", "--max-seq-len", "4096"])
    with pytest.raises(SystemExit, match="--max-seq-len must be positive"):
        sample.main(["--ckpt", str(tmp_path / "out" / "ckpt.pt"), "--max-seq-len", "0"])


def test_nonfinite_loss_stops_and_keeps_checkpoint(tmp_path, corpus):
    run(tmp_path, corpus, "--stop-at", "2")
    ckpt = tmp_path / "out" / "ckpt.pt"
    saved = ckpt.read_bytes()
    with pytest.raises(SystemExit, match="non-finite loss .* at step 4"):
        run(tmp_path, corpus, "--resume", "--lr", "1e30")
    assert ckpt.read_bytes() == saved


def test_resume_after_a_crash_between_the_two_renames(tmp_path, corpus):
    """A save swaps folders: ckpt -> ckpt.old, ckpt.tmp -> ckpt. A crash between the two leaves only
    ckpt.old; --resume must take it, and the next save must go back to ckpt."""
    full, _ = run(tmp_path / "a", corpus)
    run(tmp_path / "b", corpus, "--stop-at", "3")
    out = tmp_path / "b" / "out"
    os.replace(out / "ckpt", out / "ckpt.old")
    both, _ = run(tmp_path / "b", corpus, "--resume")
    assert both == full
    assert (out / "ckpt" / "meta.pt").exists() and not (out / "ckpt.old").exists()


def test_activation_checkpointing_gives_the_same_losses(tmp_path, corpus):
    plain, _ = run(tmp_path / "a", corpus, steps=3)
    recomputed, _ = run(tmp_path / "b", corpus, "--activation-checkpointing", steps=3)
    assert max(abs(a - b) for a, b in zip(plain, recomputed)) < 1e-5, (plain, recomputed)
