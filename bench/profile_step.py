"""Where a training step's time goes: the top CUDA kernels of one forward + backward + optimizer step.

    python bench/profile_step.py --preset small --seq-len 2048 --batch-size 8
    python bench/profile_step.py --preset small --set residual=plain
    torchrun --nproc_per_node 4 bench/profile_step.py --preset small --breakdown   # FSDP2, as train.py
    torchrun --nproc_per_node 2 bench/profile_step.py --device cpu --preset nano --seq-len 64 --batch-size 2

Random tokens (the data does not change the kernels); prints the step time and a table of the kernels
with the most CUDA time. Under torchrun every rank takes its own random batch and the model is sharded
as train.py shards it (FSDP2, `train.shard_model`); rank 0 prints, tokens/s counting all ranks' tokens.

From a profiler trace of one step it also prints the step's wall time, the summed kernel time, the
NCCL kernels' share, and how long the GPU sat idle (1 - busy / wall, busy = the union of the kernel
intervals): a launch-bound step has a GPU that waits for the host. `--breakdown` times the phases of
a train.py step on the host, with the device synchronised around each: where FSDP adds time.
`--device cpu` runs the same on the CPU (gloo under torchrun): a smoke test, with CPU ops for kernels.
"""

import argparse
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import ModelConfig, Transformer  # noqa: E402
from muon import build_optimizer  # noqa: E402
from train import parse_overrides, shard_model  # noqa: E402


def merged_length(intervals) -> float:
    """Total length of the union of (start, end) intervals."""
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if s > end:
            total, end = total + e - s, e
        elif e > end:
            total, end = total + e - end, e
    return total


def trace_summary(prof, device: torch.device, annotation: str) -> str:
    """Wall time of the `annotation` range and, on CUDA, its kernel time: summed, NCCL, busy, idle."""
    events = prof.events()
    cpu = [e for e in events if e.device_type == torch.autograd.DeviceType.CPU]
    marks = [e for e in cpu if e.name == annotation]
    if not marks:
        return "trace: the step's annotation is missing from the profile"
    start, end = marks[0].time_range.start, marks[0].time_range.end             # microseconds
    wall = end - start
    if device.type != "cuda":
        collectives = [e for e in cpu if any(k in e.name.lower() for k in ("gloo", "c10d", "nccl"))]
        outer = [(e.time_range.start, e.time_range.end) for e in collectives]
        return (f"trace of one step (rank 0): wall {wall / 1e3:.1f} ms; no CUDA kernels on the CPU; "
                f"collective ops (c10d / gloo) {merged_length(outer) / 1e3:.1f} ms of it (union of their "
                f"intervals)")
    # This process's kernels (and memcpy / memset: its one GPU's); the GPU-side copies of record_function
    # ranges (user annotations such as FSDP's) are no kernels and carry the CPU range's name: left out.
    cpu_names = {e.name for e in cpu}
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA
               and not getattr(e, "is_user_annotation", False) and e.name not in cpu_names]
    spans = [(max(e.time_range.start, start), min(e.time_range.end, end)) for e in kernels]
    spans = [(s, e) for s, e in spans if e > s]
    nccl = [(s, e) for (s, e), k in zip(spans, kernels) if "nccl" in k.name.lower()]
    compute = [(s, e) for (s, e), k in zip(spans, kernels) if "nccl" not in k.name.lower()]
    busy = merged_length(spans)
    exposed = busy - merged_length(compute)            # NCCL time with no other kernel running
    summed, nccl_ms = sum(e - s for s, e in spans), sum(e - s for s, e in nccl)
    return (f"trace of one step (rank 0): wall {wall / 1e3:.1f} ms; kernels {summed / 1e3:.1f} ms summed, "
            f"NCCL {nccl_ms / 1e3:.1f} ms of them ({exposed / 1e3:.1f} ms with no compute kernel beside); "
            f"GPU busy {busy / 1e3:.1f} ms (union of kernel intervals), idle {100 * (1 - busy / wall):.1f}%")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=8, help="sequences per rank")
    p.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE")
    p.add_argument("--rows", type=int, default=25, help="rows of the kernel table (0: no profile)")
    p.add_argument("--device", default="cuda", help="cuda | cpu (a smoke test: nano preset, gloo)")
    p.add_argument("--grad-clip", type=float, default=0.0,
                   help="clip_grad_norm_ in the profiled step (train.py clips at 1.0; 0 = off, the step "
                        "as this script always timed it)")
    p.add_argument("--breakdown", action="store_true",
                   help="also time forward+backward, clip_grad_norm_ (at --grad-clip, else 1.0), "
                        "optimizer.step, zero_grad and update_moe_bias on the host, the device "
                        "synchronised around each")
    p.add_argument("--reshard-after-forward", action=argparse.BooleanOptionalAction, default=True,
                   help="under torchrun: FSDP2 frees each block's gathered parameters after its forward "
                        "(see train.py)")
    args = p.parse_args()

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank if world > 1 else torch.cuda.current_device())
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    say = print if rank == 0 else (lambda *a, **k: None)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    torch.manual_seed(0)                                   # the same initial weights on every rank
    cfg = ModelConfig.from_preset(args.preset, max_seq_len=max(args.seq_len, 1024), **parse_overrides(args.set))
    model = Transformer(cfg).to(device)
    if world > 1:
        shard_model(model, device, reshard_after_forward=args.reshard_after_forward)
    opt = build_optimizer(model, "muon", lr=1e-3)
    x = torch.randint(0, cfg.vocab_size, (args.batch_size, args.seq_len),       # a batch of this rank's
                      generator=torch.Generator().manual_seed(1000 + rank)).to(device)
    all_reduce = (lambda t: dist.all_reduce(t)) if world > 1 else None
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step(clip=args.grad_clip, mark=lambda name: None):
        with autocast:
            _, loss = model(x, x)
        loss.backward()
        mark("forward+backward")
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            mark("clip_grad_norm_")
        opt.step()
        mark("optimizer.step")
        opt.zero_grad(set_to_none=True)
        mark("zero_grad")
        model.update_moe_bias(1e-3, all_reduce)
        mark("update_moe_bias")

    for _ in range(3):
        step()
    sync()
    if world > 1:
        dist.barrier()
    t = time.perf_counter()
    for _ in range(3):
        step()
    sync()
    dt = (time.perf_counter() - t) / 3
    tokens = args.batch_size * args.seq_len * world
    shards = f" (FSDP2 on {world} ranks{', no reshard after forward' if not args.reshard_after_forward else ''})" \
        if world > 1 else ""
    peak = f", peak {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB" if device.type == "cuda" else ""
    say(f"{args.preset} {args.set}{shards}: {dt * 1e3:.0f} ms/step, {tokens / dt:,.0f} tok/s{peak}")

    if args.breakdown:
        times = {}                                                  # phase -> host seconds per step

        def mark(name):
            nonlocal last
            sync()
            now = time.perf_counter()
            times.setdefault(name, []).append(now - last)
            last = now

        for _ in range(3):
            sync()
            last = time.perf_counter()
            step(clip=args.grad_clip if args.grad_clip > 0 else 1.0, mark=mark)
        ms = torch.tensor([1e3 * statistics.median(v) for v in times.values()], device=device)
        slowest = ms.clone()
        if world > 1:
            dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        say("host time per phase, device synchronised around each (median of 3 steps; rank 0 / slowest rank):")
        for name, a, b in zip(times, ms.tolist(), slowest.tolist()):
            say(f"  {name:18s} {a:8.1f} / {b:8.1f} ms")
        say(f"  {'sum':18s} {sum(ms.tolist()):8.1f} / {sum(slowest.tolist()):8.1f} ms")

    if args.rows > 0:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as prof:
            with torch.profiler.record_function("profile_step"):
                step()
                sync()
        if rank == 0:
            print(trace_summary(prof, device, "profile_step"))
            sort_by = "cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
            print(prof.key_averages().table(sort_by=sort_by, row_limit=args.rows, max_name_column_width=60))
    if world > 1:
        dist.barrier()                      # no rank tears down while another still communicates
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
