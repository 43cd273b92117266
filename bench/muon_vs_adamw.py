"""Muon against AdamW on the embedded corpus: how many of AdamW's steps does Muon need?

V4 trains its matrices with Muon (muon.py, V4-REFERENCE section 4). The claim to check at small scale:
for the same model, data and schedule, Muon reaches a given validation loss in fewer steps. Anchor, not
target: modded-nanogpt's optimisation track found Muon needs about 58-64% of AdamW's steps on GPT-2
small, against an AdamW its author calls probably undertuned.

What runs: train.py itself (same loop, lr schedule, grad clip, MoE bias update, evaluation), once per
(optimizer, learning rate), on a V4 model of 38M parameters (the `small` preset shrunk: dim 384,
6 layers with the official [0, 0, 4, 128, ...] pattern, 8 experts) and at most one epoch of the corpus
(about 10M tokens), so neither run memorises. Each optimizer gets the same 3-point learning-rate sweep
(Muon's update is scaled to AdamW's RMS, so one grid serves both); the best of each by final validation
loss is compared. The figure: the first step at which Muon's validation curve reaches AdamW's best
final loss (linear interpolation between evaluations), as a fraction of AdamW's steps. Muon's curve is
read mid-schedule, before its own lr decay, so the fraction is conservative; `--confirm` also trains
Muon on a schedule of that many steps and reports where it ends.

    python bench/muon_vs_adamw.py                  # one H200: data, then at most --time-budget of runs
    python bench/muon_vs_adamw.py --quick          # smoke test: one lr each, 40 short steps
    python bench/muon_vs_adamw.py --steps 400 --lrs 1e-3 2e-3 4e-3 --confirm

The learning rates run from the middle of the sweep outwards, each for both optimizers, and a report
follows every pair; a pair that would overrun `--time-budget` is skipped, so the run ends in time with a
like-for-like comparison. The last lines of the output carry the result; record them in RESULTS.md
with the command.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the repo root

import torch  # noqa: E402

import train  # noqa: E402
from data import prepare_data  # noqa: E402

# The `small` preset shrunk to 38M parameters (14.5M active without embedding and MTP).
MODEL = ["dim=384", "n_layers=6", "n_heads=6", "head_dim=64", "rope_head_dim=16", "q_lora_rank=192",
         "o_groups=2", "o_lora_rank=192", "compress_ratios=(0,0,4,128,4,128)", "index_n_heads=8",
         "index_head_dim=32", "index_topk=64", "n_routed_experts=8", "moe_inter_dim=384", "n_hash_layers=1"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=int, default=300, help="optimizer steps per run")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 2e-3, 4e-3],
                   help="learning-rate sweep, the same for both optimizers")
    p.add_argument("--vocab-size", type=int, default=8192, help="tokenizer vocabulary (trained once, cached)")
    p.add_argument("--evals", type=int, default=15, help="validation points per run")
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 40 steps of batch 8 x 256, the middle lr only")
    p.add_argument("--time-budget", type=float, default=420,
                   help="seconds of training; lr pairs that would not fit are skipped")
    p.add_argument("--confirm", action="store_true",
                   help="also train Muon on a schedule of the measured number of steps")
    p.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                   help="extra ModelConfig overrides on top of the benchmark's model")
    p.add_argument("--device", default="auto")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--cache-dir", default="cache", help="tokenizer and token shards (shared with train.py)")
    p.add_argument("--out-dir", default="out/bench_muon", help="one folder per run (metrics.jsonl)")
    args = p.parse_args(argv)
    args.lrs = sorted(args.lrs)
    if args.quick:
        args.steps, args.batch_size, args.seq_len, args.evals = 40, 8, 256, 4
        args.lrs = [args.lrs[len(args.lrs) // 2]]
    if args.steps < 1 or args.evals < 1:
        raise SystemExit("--steps and --evals must be positive")
    return args


def train_run(optimizer: str, lr: float, steps: int, args) -> tuple[list[tuple[int, float]], float]:
    """One train.py run; returns its validation curve [(step, loss)] and the wall time in seconds."""
    out = os.path.join(args.out_dir, f"{optimizer}-lr{lr:g}-steps{steps}")
    shutil.rmtree(out, ignore_errors=True)                   # metrics.jsonl is appended to
    argv = ["--preset", "small", "--set", *MODEL, f"max_seq_len={args.seq_len}", *args.set,
            "--vocab-size", str(args.vocab_size), "--cache-dir", args.cache_dir, "--out-dir", out,
            "--optimizer", optimizer, "--lr", str(lr), "--steps", str(steps),
            "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
            "--warmup-steps", str(max(1, steps // 10)), "--eval-interval", str(max(1, steps // args.evals)),
            "--eval-batches", str(args.eval_batches), "--log-interval", str(max(1, steps // 10)),
            "--ckpt-interval", str(10 * steps), "--device", args.device]
    if args.compile:
        argv.append("--compile")
    print(f"\n=== {optimizer} lr {lr:g}, {steps} steps ===", flush=True)
    t0 = time.time()
    train.main(argv)
    seconds = time.time() - t0
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r], seconds


def step_reaching(curve: list[tuple[int, float]], target: float) -> float | None:
    """First step at which the curve reaches `target`, interpolated between evaluations."""
    prev_step, prev_loss = 0, math.inf
    for step, loss in curve:
        if loss <= target:
            if math.isinf(prev_loss):
                return float(step)
            return prev_step + (step - prev_step) * (prev_loss - target) / (prev_loss - loss)
        prev_step, prev_loss = step, loss
    return None


def report(results: dict, args) -> tuple[float, float | None]:
    """Print the sweep table, both best curves and the step fraction; returns (Muon's best lr, step)."""
    print("\noptimizer      lr   final val   best val   time (s)")
    best = {}
    for (optimizer, lr), (curve, seconds) in sorted(results.items()):
        print(f"{optimizer:>9} {lr:>7g}   {curve[-1][1]:9.4f}   {min(v for _, v in curve):8.4f}   {seconds:8.0f}")
        if optimizer not in best or curve[-1][1] < results[optimizer, best[optimizer]][0][-1][1]:
            best[optimizer] = lr
    for optimizer, lr in best.items():
        tried = sorted(l for o, l in results if o == optimizer)
        if len(tried) > 1 and lr in (tried[0], tried[-1]):
            print(f"note: {optimizer}'s best lr {lr:g} is at the edge of its sweep {tried}")

    adamw_curve, muon_curve = results["adamw", best["adamw"]][0], results["muon", best["muon"]][0]
    print(f"\nvalidation loss against steps (best lr: adamw {best['adamw']:g}, muon {best['muon']:g})")
    print(" step    adamw     muon")
    for (step, a), (_, m) in zip(adamw_curve, muon_curve):
        print(f"{step:5d}  {a:7.4f}  {m:7.4f}")
    target = adamw_curve[-1][1]
    reached = step_reaching(muon_curve, target)
    print(f"\nAdamW's best final val loss: {target:.4f} at step {args.steps} (lr {best['adamw']:g})")
    if reached is None:
        print(f"Muon (lr {best['muon']:g}) does not reach it within {args.steps} steps: "
              f"final {muon_curve[-1][1]:.4f}", flush=True)
    else:
        print(f"Muon (lr {best['muon']:g}) reaches it at step {reached:.0f}: "
              f"{100 * reached / args.steps:.0f}% of AdamW's steps", flush=True)
    return best["muon"], reached


def main(argv=None):
    args = parse_args(argv)
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    print(f"muon_vs_adamw | torch {torch.__version__} | {gpu} | steps {args.steps} | batch "
          f"{args.batch_size} x {args.seq_len} | lrs {args.lrs} | budget {args.time_budget:g} s")
    t0 = time.time()
    _, train_tokens, _ = prepare_data(None, vocab_size=args.vocab_size, cache_dir=args.cache_dir)
    tokens = args.steps * args.batch_size * args.seq_len
    print(f"data ready in {time.time() - t0:.0f} s: {len(train_tokens):,} training tokens; "
          f"each run reads {tokens:,} ({tokens / len(train_tokens):.2f} epochs)")
    if tokens > len(train_tokens):
        raise SystemExit("more than one epoch: lower --steps, --batch-size or --seq-len")

    # The middle lr first, then outwards, each lr for both optimizers: if the time budget runs out,
    # what was done is still a like-for-like comparison. A report is printed after every pair.
    middle = len(args.lrs) // 2
    order = [args.lrs[i] for i in sorted(range(len(args.lrs)), key=lambda i: abs(i - middle))]
    results = {}                                             # (optimizer, lr) -> (curve, seconds)
    t_start, slowest_pair = time.time(), 0.0
    for lr in order:
        if results and time.time() - t_start + slowest_pair > args.time_budget:
            print(f"\ntime budget: skipping lr {lr:g} (a pair takes about {slowest_pair:.0f} s)")
            continue
        t_pair = time.time()
        for optimizer in ("adamw", "muon"):
            results[optimizer, lr] = train_run(optimizer, lr, args.steps, args)
        slowest_pair = max(slowest_pair, time.time() - t_pair)
        best_muon_lr, reached = report(results, args)

    if args.confirm and reached is not None:
        short = max(1, math.ceil(reached))
        curve, _ = train_run("muon", best_muon_lr, short, args)
        print(f"confirm: Muon trained on a {short}-step schedule ends at {curve[-1][1]:.4f} "
              f"(AdamW's best {args.steps}-step final: "
              f"{min(c[-1][1] for (o, _), (c, _) in results.items() if o == 'adamw'):.4f})")


if __name__ == "__main__":
    main()
