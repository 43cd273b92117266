"""Pre-train a V4 model (or one of its ablation twins) on the embedded corpus or your own data.

    python train.py                                  # nano V4 on the Python standard library, CPU ok
    python train.py --preset small --data my.txt     # one GPU
    python train.py --attention full --ffn dense --residual plain --optimizer adamw   # the baseline

The loop is flat on purpose: batch -> model(tokens, targets) -> loss.backward() -> clip -> step ->
MoE bias update -> schedule. V4's learning-rate schedule: linear warm-up, constant, then a cosine
decay over the last `--decay-frac` of training to `--min-lr-frac` of the peak. The MTP loss weight
follows it: 0.3 until the decay starts, 0.1 after.

Checkpoints are self-contained (weights, config, tokenizer, arguments, optimizer, RNG states, step):
out_dir/ckpt/ is the resumable state (torch.distributed.checkpoint, any number of ranks) and
out_dir/ckpt.pt the consolidated weights for sample.py; both are written beside the old ones and renamed
over them, so a crash while saving never damages the last good checkpoint. `--resume` continues
exactly: batches are a pure function of (seed, step, rank), so the data position is the step.
Under torchrun the same loop runs with FSDP2 (see `shard_model`).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import gc
import json
import math
import os
import shutil
import time
import warnings

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_state_dict, set_state_dict)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from data import iter_eval_batches, prepare_data, sample_batch, tokenizer_from_state, tokenizer_state
from model import PRESETS, ModelConfig, Transformer
from moe import MoE
from muon import build_optimizer

H200_BF16_PEAK = 989e12   # dense bf16 FLOP/s of an H100/H200 SXM by the datasheet, for MFU
# DCP without torchrun is the one-process case we mean; say nothing about it.
warnings.filterwarnings("ignore", message="torch.distributed is disabled")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown, and the examples kept as written."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Train a DeepSeek V4 model (nanov4). Defaults train the nano preset on the "
                    "embedded corpus (the Python standard library's source) on the CPU in minutes.",
        formatter_class=HelpFormatter,
        epilog="examples:\n"
               "  python train.py                                         # nano V4, CPU, minutes\n"
               "  python train.py --preset small --data corpus/ --seq-len 4096   # one GPU\n"
               "  torchrun --nproc_per_node 4 train.py --preset small ...        # FSDP2\n"
               "  python train.py --out-dir out/nano --resume             # continue exactly\n"
               "  python train.py --plot out/nano/metrics.jsonl           # loss curves to PNG")
    g = p.add_argument_group("model")
    g.add_argument("--preset", default="nano", choices=sorted(PRESETS), help="model size")
    g.add_argument("--attention", choices=["v4", "full"], help="override: hybrid V4 attention or the full twin")
    g.add_argument("--ffn", choices=["moe", "dense"], help="override: DeepSeekMoE or the dense twin")
    g.add_argument("--residual", choices=["mhc", "plain"], help="override: mHC or the plain residual")
    g.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                   help="override any ModelConfig field, e.g. --set dim=256 n_layers=6")
    g.add_argument("--fp8", action="store_true", help="FP8 block-scaled GEMM for attention and expert projections")
    g.add_argument("--index-fp8", action="store_true",
                   help="the lightning indexer's top-k in FP8: e4m3 keys and queries, one scale per row")
    g = p.add_argument_group("data")
    g.add_argument("--data", default=None, help="text file, directory of text files, or token shard "
                   "(.bin/.npy); default: the embedded corpus")
    g.add_argument("--tokenizer", default=None, help="tokenizer file to use instead of training one")
    g.add_argument("--vocab-size", type=int, default=None, help="tokenizer vocabulary (default: the preset's)")
    g.add_argument("--tokenizer-sample-mb", type=float, default=4.0, help="MB of text the tokenizer trains on")
    g.add_argument("--cache-dir", default="cache", help="where tokenizers and token shards are cached")
    g = p.add_argument_group("optimisation")
    g.add_argument("--optimizer", choices=["muon", "adamw"], default="muon",
                   help="V4's hybrid Muon (AdamW for embeddings, norms, mHC gates) or plain AdamW")
    g.add_argument("--steps", type=int, default=300, help="optimizer steps")
    g.add_argument("--batch-size", type=int, default=8, help="sequences per micro-batch (per rank)")
    g.add_argument("--seq-len", type=int, default=256, help="tokens per sequence")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    g.add_argument("--warmup-steps", type=int, default=50, help="linear warm-up steps")
    g.add_argument("--decay-frac", type=float, default=0.2, help="fraction of steps in the final decay")
    g.add_argument("--min-lr-frac", type=float, default=0.1, help="final lr as a fraction of the peak")
    g.add_argument("--weight-decay", type=float, default=0.1, help="decoupled, on matrices only")
    g.add_argument("--grad-clip", type=float, default=1.0, help="global grad-norm clip (0 = off)")
    g.add_argument("--bias-gamma", type=float, default=1e-3, help="MoE aux-loss-free bias step")
    g.add_argument("--csa-stage", choices=["dense", "sparse"], default=None,
                   help="CSA layers: 'dense' attends all visible compressed entries (V4's early stage)")
    g.add_argument("--indexer-warmup-steps", type=int, default=0,
                   help="first N steps train only the lightning indexer (main model frozen)")
    g = p.add_argument_group("run")
    g.add_argument("--out-dir", default="out/nano", help="checkpoint and metrics.jsonl go here")
    g.add_argument("--resume", action="store_true", help="continue from out-dir/ckpt.pt")
    g.add_argument("--seed", type=int, default=1337, help="model init and data order")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    g.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16", help="autocast dtype on CUDA")
    g.add_argument("--compile", action="store_true", help="torch.compile the model (CUDA)")
    g.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute each block in the backward pass (less memory, ~30%% more compute)")
    g.add_argument("--reshard-after-forward", action=argparse.BooleanOptionalAction, default=True,
                   help="FSDP2 (torchrun): free each block's all-gathered parameters after its forward "
                        "and gather them again in the backward (least memory). --no-reshard-after-forward "
                        "keeps them from forward to backward: no second all-gather, at the cost of the "
                        "unsharded bf16 parameters' memory (~1.1 GB for the small preset); good for small "
                        "models whose step is launch-bound. A speed setting: a resume may change it")
    g.add_argument("--eval-interval", type=int, default=100, help="steps between validation losses")
    g.add_argument("--eval-batches", type=int, default=10, help="batches per validation loss")
    g.add_argument("--log-interval", type=int, default=10,
                   help="steps between metrics.jsonl rows (diagnostics every 10 rows)")
    g.add_argument("--ckpt-interval", type=int, default=100, help="also saved at the end")
    g.add_argument("--stop-at", type=int, default=None,
                   help="stop (with a checkpoint) after this step, as a preempted job would; --resume continues")
    g.add_argument("--plot", metavar="METRICS_JSONL", help="draw train/val loss curves to a PNG and exit")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------
# checkpoints
#   out_dir/ckpt/    the resumable state, through torch.distributed.checkpoint (DCP): sharded model and
#                    optimizer (each rank writes its shards), meta.pt (config, tokenizer, arguments, step)
#                    and rng-<rank>.pt. Loads on any number of ranks, one process included.
#   out_dir/ckpt.pt  the consolidated weights + config + tokenizer, one file for sample.py and opd.py.
# Both are written beside the old ones and renamed over them, so a crash (even kill -9) during a save
# never damages the last good checkpoint.
# ------------------------------------------------------------------------------------------------
def save_checkpoint(path: str, state: dict) -> None:
    """torch.save to a temporary file in the same folder, then an atomic rename over `path`."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str) -> dict:
    """Read a consolidated checkpoint (ckpt.pt), with clear errors for a missing or corrupt file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path!r}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated or not a torch file
        raise ValueError(f"checkpoint {path!r} is corrupt or not a nanov4 checkpoint: {e}") from e
    for key in ("model", "config", "tokenizer"):
        if not isinstance(state, dict) or key not in state:
            raise ValueError(f"checkpoint {path!r} lacks {key!r}: not a nanov4 checkpoint")
    return state


def model_from_checkpoint(state: dict, device="cpu") -> tuple[Transformer, object]:
    """The model of a consolidated checkpoint on `device`, and its tokenizer. Built on the meta device
    and materialised empty, so no time goes into a random initialisation that the weights overwrite."""
    cfg = ModelConfig.from_dict(state["config"])
    with torch.device("meta"):
        model = Transformer(cfg)
    model = model.to_empty(device=device)
    model.load_state_dict(state["model"])              # every persistent tensor, strictly
    for moe in model.moe_layers():                     # the one non-persistent buffer: load counts
        moe.load.zero_()
    return model, tokenizer_from_state(state["tokenizer"])


def save_training_state(folder: str, model, optimizer, meta: dict, rank: int) -> None:
    """DCP save into folder.tmp, then rank 0 swaps it in: folder -> folder.old, folder.tmp -> folder."""
    tmp, old = folder + ".tmp", folder + ".old"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp)
    torch.save(rng_state(), os.path.join(tmp, f"rng-{rank}.pt"))
    if rank == 0:
        torch.save(meta, os.path.join(tmp, "meta.pt"))
    barrier()
    if rank == 0:
        if os.path.isdir(folder):
            shutil.rmtree(old, ignore_errors=True)
            os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
    barrier()


def find_training_state(folder: str) -> str:
    """The last complete state: `folder`, or `folder.old` if a crash hit between the two renames."""
    for candidate in (folder, folder + ".old"):
        if os.path.isfile(os.path.join(candidate, "meta.pt")):
            return candidate
    raise FileNotFoundError(f"--resume: no training state in {folder!r} (nothing saved yet?)")


def load_training_state(folder: str, model, optimizer, rank: int) -> None:
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=folder)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    rng_file = os.path.join(folder, f"rng-{rank}.pt")
    if os.path.isfile(rng_file):          # absent when resuming on more ranks than saved
        set_rng_state(torch.load(rng_file, weights_only=False))


def rng_state() -> dict:
    return {"cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ------------------------------------------------------------------------------------------------
# distributed: one process per GPU under torchrun, FSDP2 per block then the root
# ------------------------------------------------------------------------------------------------
def setup_distributed() -> tuple[int, int, int]:
    """(rank, world_size, local_rank); (0, 1, 0) without torchrun."""
    if "RANK" not in os.environ:
        return 0, 1, 0
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size(), local_rank


def barrier():
    if dist.is_initialized():
        dist.barrier()


def shard_model(model: Transformer, device: torch.device, reshard_after_forward: bool = True) -> None:
    """FSDP2: fully_shard each block's attention and FFN with bf16 parameters and fp32 gradient
    reduction (on CUDA), then the block itself and the root in fp32: what a block holds directly (its
    norms and mHC parameters), the MoE gates and the root (embedding, head, hc_head, norm; small) stay
    fp32 as V4 keeps its mHC and gate arithmetic.

    reshard_after_forward=False keeps each unit's gathered parameters from its forward to its backward
    (no all-gather in the backward; memory: the unsharded parameters). The root keeps FSDP2's default,
    which never reshards it after the forward (the backward needs its parameters first)."""
    bf16 = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if device.type == "cuda" else MixedPrecisionPolicy()
    fp32 = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
    reshard = dict(reshard_after_forward=reshard_after_forward)
    for block in list(model.layers) + list(model.mtp):
        if isinstance(block.ffn, MoE):
            fully_shard(block.ffn.gate, mp_policy=fp32, **reshard)
        fully_shard(block.attn, mp_policy=bf16, **reshard)
        fully_shard(block.ffn, mp_policy=bf16, **reshard)
        fully_shard(block, mp_policy=fp32, **reshard)
    fully_shard(model, mp_policy=fp32)


# ------------------------------------------------------------------------------------------------
# schedule, evaluation, plotting
# ------------------------------------------------------------------------------------------------
def lr_at(step: int, args) -> float:
    """V4's schedule: linear warm-up, constant, cosine decay over the last decay_frac of training."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    decay_start = int(args.steps * (1 - args.decay_frac))
    if step < decay_start:
        return args.lr
    progress = (step - decay_start) / max(1, args.steps - decay_start)
    floor = args.lr * args.min_lr_frac
    return floor + (args.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def in_decay(step: int, args) -> bool:
    return step >= int(args.steps * (1 - args.decay_frac))


@torch.no_grad()
def evaluate(model, tokens, args, device, autocast) -> float:
    model.eval()
    losses = []
    for x, y in iter_eval_batches(tokens, args.batch_size, args.seq_len, args.eval_batches):
        with autocast:
            logits = model(x.to(device))
        losses.append(torch.nn.functional.cross_entropy(
            logits.float().flatten(0, 1), y.to(device).flatten()).item())
    model.train()
    return sum(losses) / len(losses)


def plot(metrics_path: str) -> str:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("plotting needs matplotlib, an optional dependency: pip install matplotlib")
    rows = [json.loads(line) for line in open(metrics_path)]
    train = [(r["step"], r.get("ce", r["loss"])) for r in rows if "loss" in r]   # next-token CE, as val
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train (next-token CE)", alpha=0.7)
    if val:
        ax.plot(*zip(*val), "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    out = os.path.splitext(metrics_path)[0] + ".png"
    fig.savefig(out, dpi=120, bbox_inches="tight")
    return out


# ------------------------------------------------------------------------------------------------
# setup
# ------------------------------------------------------------------------------------------------
def parse_overrides(pairs) -> dict:
    fields = {f.name: f for f in dataclasses.fields(ModelConfig)}
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise SystemExit(f"--set expects FIELD=VALUE, got {pair!r}")
        key, value = pair.split("=", 1)
        if key not in fields:
            raise SystemExit(f"--set: ModelConfig has no field {key!r}")
        try:
            out[key] = ast.literal_eval(value)      # numbers, tuples, True/False
        except (ValueError, SyntaxError):
            out[key] = value                        # a bare string such as attention=full
    return out


def build_config(args, vocab_size: int) -> ModelConfig:
    overrides = parse_overrides(args.set)
    for name in ("attention", "ffn", "residual"):
        if getattr(args, name):
            overrides[name] = getattr(args, name)
    if args.csa_stage:
        overrides["csa_stage"] = args.csa_stage
    overrides["fp8"] = args.fp8 or overrides.get("fp8", False)
    overrides["index_fp8"] = args.index_fp8 or overrides.get("index_fp8", False)
    overrides["vocab_size"] = vocab_size
    overrides.setdefault("max_seq_len", max(args.seq_len, ModelConfig.from_preset(args.preset).max_seq_len))
    try:
        return ModelConfig.from_preset(args.preset, **overrides)
    except ValueError as e:
        raise SystemExit(f"bad model configuration: {e}")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def set_indexer_warmup(model: Transformer, on: bool) -> None:
    """Warm-up stage: only the lightning indexers learn; the main attention attends all entries."""
    model.cfg.csa_stage = "warmup" if on else "sparse"
    for name, p in model.named_parameters():
        p.requires_grad_(not on or ".indexer." in name)


def check_resume_compatible(saved: dict, args) -> None:
    """Arguments that change the model or the data stream must match to resume (speed and memory
    switches such as --compile or --reshard-after-forward may change)."""
    keys = ["preset", "attention", "ffn", "residual", "set", "data", "seq_len", "batch_size",
            "grad_accum", "seed", "optimizer", "fp8", "steps"]
    diff = [f"{k}: checkpoint {saved.get(k)!r} != now {getattr(args, k)!r}"
            for k in keys if saved.get(k) != getattr(args, k)]
    if diff:
        raise SystemExit("cannot resume, the run's arguments differ from the checkpoint's:\n  " + "\n  ".join(diff))


def main(argv=None):
    args = parse_args(argv)
    if args.plot:
        print(f"wrote {plot(args.plot)}")
        return
    rank, world, local_rank = setup_distributed()
    if world > 1 and args.device == "auto" and torch.cuda.is_available():
        device = torch.device(f"cuda:{local_rank}")                  # one GPU per process
    else:
        device = pick_device(args.device)
    master = rank == 0
    say = print if master else (lambda *a, **k: None)
    torch.manual_seed(args.seed)
    state_dir, ckpt_path = os.path.join(args.out_dir, "ckpt"), os.path.join(args.out_dir, "ckpt.pt")
    meta = None
    if args.resume:
        resume_dir = find_training_state(state_dir)
        meta = torch.load(os.path.join(resume_dir, "meta.pt"), weights_only=False)
        check_resume_compatible(meta["args"], args)

    # --- data and tokenizer (rank 0 first, so the other ranks find them cached) ---
    tokenizer = tokenizer_from_state(meta["tokenizer"]) if meta else args.tokenizer
    vocab = args.vocab_size or ModelConfig.from_preset(args.preset).vocab_size
    if rank > 0:
        barrier()                                   # wait for rank 0 to build the caches
    try:
        enc, train_tokens, val_tokens = prepare_data(args.data, vocab_size=vocab, cache_dir=args.cache_dir,
                                                     tokenizer=tokenizer,
                                                     tokenizer_sample_mb=args.tokenizer_sample_mb)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"data: {e}")
    if rank == 0:
        barrier()
    say(f"data: {len(train_tokens):,} train / {len(val_tokens):,} validation tokens, vocabulary {enc.n_vocab}")

    # --- model and optimizer ---
    cfg = ModelConfig.from_dict(meta["config"]) if meta else build_config(args, enc.n_vocab)
    model = Transformer(cfg).to(device)
    say(model.accounting(args.seq_len))
    flops_per_token = model.flops_per_token(args.seq_len)
    for block in list(model.layers) + list(model.mtp):
        block.activation_checkpointing = args.activation_checkpointing
    if world > 1:
        shard_model(model, device, reshard_after_forward=args.reshard_after_forward)
    optimizer = build_optimizer(model, args.optimizer, lr=args.lr, weight_decay=args.weight_decay)
    start_step = 0
    if meta:
        load_training_state(resume_dir, model, optimizer, rank)
        start_step = meta["step"]
        say(f"resumed from {resume_dir} at step {start_step}")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16,
                              enabled=device.type == "cuda" and args.dtype == "bf16")
    step_model = torch.compile(model) if args.compile and device.type == "cuda" else model
    all_reduce = (lambda t: dist.all_reduce(t)) if world > 1 else None

    def checkpoint(step):
        meta = {"config": cfg.to_dict(), "tokenizer": tokenizer_state(enc), "args": vars(args), "step": step}
        save_training_state(state_dir, model, optimizer, meta, rank)
        weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if master:
            save_checkpoint(ckpt_path, {"model": weights, **meta})

    from tqdm import tqdm
    os.makedirs(args.out_dir, exist_ok=True)
    log = open(os.path.join(args.out_dir, "metrics.jsonl"), "a") if master else None
    tokens_per_step = args.batch_size * args.seq_len * args.grad_accum * world
    bar = tqdm(range(start_step, args.steps), initial=start_step, total=args.steps, dynamic_ncols=True,
               disable=None if master else True)
    model.train()
    t_last, last_logged = time.time(), start_step
    for step in bar:
        if args.indexer_warmup_steps:
            set_indexer_warmup(model, step < args.indexer_warmup_steps)
        lr = lr_at(step, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        model.mtp_loss_weight = 0.1 if in_decay(step, args) else 0.3
        step_loss = torch.zeros((), device=device)
        for micro in range(args.grad_accum):
            if world > 1:     # FSDP2: reduce-scatter the gradients once, after the last micro-batch
                model.set_requires_gradient_sync(micro == args.grad_accum - 1)
            x, y = sample_batch(train_tokens, args.batch_size, args.seq_len, args.seed,
                                step * args.grad_accum + micro, rank)
            with autocast:
                _, loss = step_model(x.to(device), y.to(device))
            (loss / args.grad_accum).backward()
            step_loss += loss.detach() / args.grad_accum
        if all_reduce:
            all_reduce(step_loss)
            step_loss /= world
        if not torch.isfinite(step_loss):
            raise SystemExit(f"non-finite loss ({step_loss.item()}) at step {step + 1}: stopping; the "
                             f"last good checkpoint in {args.out_dir} is untouched")
        grad_norm = (torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
                     if args.grad_clip > 0 else torch.zeros(()))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.update_moe_bias(args.bias_gamma, all_reduce)   # loads summed over ranks first

        if master and ((step + 1) % args.log_interval == 0 or step == start_step):
            if device.type == "cuda":
                torch.cuda.synchronize()
            dt = (time.time() - t_last) / (step + 1 - last_logged)     # seconds per step since the last row
            t_last, last_logged = time.time(), step + 1
            tok_s = tokens_per_step / dt
            row = {"step": step + 1, "loss": step_loss.item(), "lr": lr, "grad_norm": float(grad_norm),
                   "tok_s": tok_s, **{k: v.item() for k, v in model.metrics.items()}}
            if device.type == "cuda":
                row["mfu"] = flops_per_token * tok_s / (H200_BF16_PEAK * world)
                row["mem_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
            if world == 1 and (step + 1) % (args.log_interval * 10) == 0:
                with autocast:    # as in training: the MoE's grouped GEMM wants bf16
                    row.update(model.diagnostics(x[:1].to(device)))
            log.write(json.dumps(row) + "\n")
            log.flush()
            post = {"loss": f"{row['loss']:.3f}", "tok/s": f"{tok_s:,.0f}"}
            if "mfu" in row:
                post["mfu"] = f"{100 * row['mfu']:.1f}%"
            bar.set_postfix(post)
        t_aside = time.time()                       # evaluation and saving stay out of tokens/s
        if (step + 1) % args.eval_interval == 0 or step + 1 == args.steps:
            val = evaluate(model, val_tokens, args, device, autocast)
            if master:
                log.write(json.dumps({"step": step + 1, "val_loss": val}) + "\n")
                log.flush()
                bar.write(f"step {step + 1}: val loss {val:.4f}")
        stopping = args.stop_at is not None and step + 1 >= args.stop_at
        if (step + 1) % args.ckpt_interval == 0 or step + 1 == args.steps or stopping:
            checkpoint(step + 1)
        if stopping:
            break
        t_last += time.time() - t_aside
    if master:
        log.close()
        say(f"saved {ckpt_path}")
    if dist.is_initialized():
        dist.barrier()                  # no rank tears down while another still communicates
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # Free what may still reference the process groups (FSDP state, the device mesh) while the
    # interpreter is whole: left to interpreter shutdown, a gloo worker thread can abort the process
    # ("terminate called without an active exception", SIGABRT; seen once in a CPU run of
    # tests/test_fsdp.py, after the checkpoint was saved; cf. pytorch/pytorch PR 179291).
    gc.collect()
