"""Where a decode step's time goes: prefill a random prompt, then time token-by-token decode.

    python bench/profile_decode.py --preset small --context 4096 --new-tokens 64
    python bench/profile_decode.py --preset small --kernels reference --rows 0

Random weights and tokens (they do not change the kernels). Prints prefill and decode tokens/s, the
per-token latency, the host time of one decode step against its device time (a step whose host time
is the larger is launch-bound), the kernel launches per token, and the top operators of a few steps.
"""

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import ModelConfig, Transformer  # noqa: E402
from sample import prefill  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small")
    p.add_argument("--context", type=int, default=4096, help="prompt length before decoding")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--kernels", choices=["auto", "reference"], default="auto")
    p.add_argument("--fp8", action="store_true")
    p.add_argument("--rows", type=int, default=20, help="operators in the profile table (0: none)")
    p.add_argument("--device", default="cuda")
    args = p.parse_args()
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    cfg = ModelConfig.from_preset(args.preset, max_seq_len=args.context + args.new_tokens + 16,
                                  kernels=args.kernels, fp8=args.fp8)
    model = Transformer(cfg).to(dev, torch.bfloat16 if dev.type == "cuda" else torch.float32).eval()
    torch.manual_seed(0)
    prompt = torch.randint(0, cfg.vocab_size, (args.batch_size, args.context), device=dev)

    with torch.no_grad():
        for attempt in ("warm-up", "timed"):        # the first pass compiles and tunes the kernels
            cache = model.new_cache(args.batch_size)
            sync()
            t0 = time.perf_counter()
            logits = prefill(model, prompt, cache, chunk=2048)
            sync()
            t1 = time.perf_counter()
            token = logits.argmax(-1)[:, None]
            steps = args.new_tokens if attempt == "timed" else 4
            for _ in range(steps):
                token = model(token, cache=cache)[:, -1].argmax(-1)[:, None]
            sync()
            t2 = time.perf_counter()
        # host time of one step: the Python and launch work, measured without waiting for the GPU
        # (the queue is empty at the start, so this is the time to enqueue one step)
        h0 = time.perf_counter()
        token = model(token, cache=cache)[:, -1].argmax(-1)[:, None]
        h1 = time.perf_counter()
        sync()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(4):
                token = model(token, cache=cache)[:, -1].argmax(-1)[:, None]
            sync()
    on_gpu = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    kernels = sum(e.count for e in on_gpu)
    device_ms = sum(e.self_device_time_total for e in on_gpu) / 4 / 1e3
    step_ms = (t2 - t1) / args.new_tokens * 1e3
    print(f"{args.preset} kernels={args.kernels} fp8={args.fp8} B={args.batch_size} context={args.context}: "
          f"prefill {args.batch_size * args.context / (t1 - t0):,.0f} tok/s, decode {step_ms:.1f} ms/token "
          f"({args.batch_size * 1e3 / step_ms:,.1f} tok/s); one step: host {1e3 * (h1 - h0):.1f} ms, device "
          f"{device_ms:.1f} ms, {kernels / 4:.0f} kernel launches; cache {cache.nbytes() / 2**20:.1f} MiB")
    if args.rows:
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=args.rows, max_name_column_width=50))


if __name__ == "__main__":
    main()
