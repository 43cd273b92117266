"""Peak GPU memory and time of one training step (forward + backward) of a V4 attention stack shaped like
the `small` preset (its 12 layers' compression ratios, heads, window and top-k; each layer
x = x + Attention(RMSNorm(x)), no FFN), at long sequence lengths, next to the full-attention twin measured
in the same process. Issue 3 item 6: the small preset must train at T = 8192; we report the longest T.

    python bench/bench_attention_memory.py                      # T = 8192 16384 32768 65536
    python bench/bench_attention_memory.py --T 65536 131072 --checkpoint

The last lines print one row per (attention, T): peak memory (torch.cuda.max_memory_allocated) and the
median step time; "OOM" when the step does not fit.
"""

import argparse
import gc
import os
import platform
import sys
import time

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from attention import Attention, RMSNorm  # noqa: E402
from model import ModelConfig  # noqa: E402


class AttentionStack(nn.Module):
    def __init__(self, cfg, use_checkpoint: bool):
        super().__init__()
        self.norms = nn.ModuleList(RMSNorm(cfg.dim, cfg.norm_eps) for _ in range(cfg.n_layers))
        self.attns = nn.ModuleList(Attention(cfg, i) for i in range(cfg.n_layers))
        self.use_checkpoint = use_checkpoint

    def forward(self, x):
        indexer_loss = x.new_zeros((), dtype=torch.float32)
        for norm, attn in zip(self.norms, self.attns):
            def layer(h, norm=norm, attn=attn):   # returns the indexer KL too, so checkpointing keeps it
                out = attn(norm(h))
                loss = attn.indexer_loss
                return out, (out.new_zeros((), dtype=torch.float32) if loss is None else loss)
            out, loss = checkpoint(layer, x, use_reentrant=False) if self.use_checkpoint else layer(x)
            x, indexer_loss = x + out, indexer_loss + loss
        return x, indexer_loss


def step(model, x):
    y, indexer_loss = model(x)
    (y.float().square().mean() + indexer_loss).backward()


def measure(cfg, T, args):
    torch.manual_seed(0)
    model = AttentionStack(cfg, args.checkpoint).cuda().to(torch.bfloat16).train()
    x = torch.randn(args.batch, T, cfg.dim, device="cuda", dtype=torch.bfloat16)
    try:
        step(model, x)                                    # warm-up
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            step(model, x)
            model.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        peak = torch.cuda.max_memory_allocated() / 2 ** 30
        result = f"{peak:9.1f} GiB {sorted(times)[len(times) // 2] * 1e3:10.0f} ms"
    except torch.cuda.OutOfMemoryError:
        result = f"{'OOM':>13} {'-':>13}"
    del model, x
    gc.collect()
    torch.cuda.empty_cache()
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--T", type=int, nargs="+", default=[8192, 16384, 32768, 65536], help="sequence lengths")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per point (after one warm-up)")
    parser.add_argument("--csa-stage", default="sparse", choices=["dense", "warmup", "sparse"])
    parser.add_argument("--checkpoint", action="store_true", help="recompute each layer in the backward pass")
    parser.add_argument("--no-twin", action="store_true", help="skip the full-attention twin")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_attention_memory.py needs a CUDA GPU")
    print(f"# {torch.cuda.get_device_name()} | torch {torch.__version__} | python {platform.python_version()}")
    print(f"# small-preset attention stack, batch {args.batch}, bf16, csa_stage {args.csa_stage}, "
          f"checkpoint {args.checkpoint}")
    kinds = ["v4"] + ([] if args.no_twin else ["full"])
    rows = []
    for T in args.T:
        for kind in kinds:
            cfg = ModelConfig.from_preset("small", attention=kind, csa_stage=args.csa_stage,
                                          max_seq_len=max(T, 65536))
            rows.append(f"{kind:>5} {T:>8} {measure(cfg, T, args)}")
            print(rows[-1], flush=True)
    print(f"\n{'attn':>5} {'T':>8} {'peak':>13} {'step':>13}")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
