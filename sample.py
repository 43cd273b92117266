"""Generate text from a nanov4 checkpoint with the decode caches.

    python sample.py --ckpt out/nano/ckpt.pt --prompt "def fibonacci(n):"
    python sample.py --ckpt out/small/ckpt.pt --prompt-file long_context.txt --prefill-chunk 4096

Prefill and decode are separate steps, as in gpt-fast: the prompt goes through the model in chunks of
`--prefill-chunk` tokens, filling each layer's cache (V4: the window ring buffer and the incomplete
compressor blocks as a fixed-size state, plus the growing compressed-KV and indexer-key caches); then
one token at a time. Feeding the prompt in one call, in chunks or token by token gives the same
logits (tests/test_model.py holds them equal). At the end it reports prefill and decode tokens/s and
the cache memory.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from train import load_checkpoint, model_from_checkpoint


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Sample from a nanov4 checkpoint, streaming the text.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", default="out/nano/ckpt.pt", help="checkpoint written by train.py")
    p.add_argument("--prompt", default="", help="prompt text (empty: start from <|bos|>)")
    p.add_argument("--prompt-file", help="read the prompt from this file instead")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (1 = off)")
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--prefill-chunk", type=int, default=2048, help="tokens per prefill call")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16", help="weights and cache dtype on CUDA")
    p.add_argument("--fp8", action="store_true", help="FP8 block-scaled GEMM in the projections")
    p.add_argument("--index-fp8", action="store_true",
                   help="the lightning indexer in FP8: its cached keys in e4m3 (half the bytes), FP8 top-k")
    p.add_argument("--kernels", choices=["auto", "reference"], default="auto",
                   help="auto: the Triton kernels on CUDA; reference: the plain PyTorch code")
    p.add_argument("--max-seq-len", type=int, default=None,
                   help="raise the checkpoint's position limit for a longer context than it was trained "
                        "to (positions past the training length are extrapolation: the compressed "
                        "layers' YaRN is built for it, the window layers' RoPE sees only the last 128)")
    return p.parse_args(argv)


def sample_next(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [B, vocab] -> next token ids [B]."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) > top_p   # keep the smallest set reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def prefill(model, tokens: torch.Tensor, cache, chunk: int) -> torch.Tensor:
    """Feed the prompt [B, T] in chunks; returns the logits of its last position [B, vocab]."""
    for start in range(0, tokens.size(1), chunk):
        logits = model(tokens[:, start:start + chunk], cache=cache)
    return logits[:, -1]


@torch.no_grad()
def generate(model, prompt: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, prefill_chunk: int = 2048, seed: int = 0,
             on_token=None) -> tuple[torch.Tensor, dict]:
    """prompt [B, T] -> (generated ids [B, max_new_tokens], timing/cache stats)."""
    model.eval()
    B, T = prompt.shape
    if T + max_new_tokens > model.cfg.max_seq_len:
        raise ValueError(f"prompt of {T} tokens + {max_new_tokens} new tokens exceeds the model's "
                         f"max_seq_len of {model.cfg.max_seq_len}")
    device = prompt.device
    generator = torch.Generator(device=device).manual_seed(seed)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    cache = model.new_cache(B)
    t0 = time.perf_counter()
    logits = prefill(model, prompt, cache, prefill_chunk)
    sync()
    t1 = time.perf_counter()
    out = []
    for _ in range(max_new_tokens):
        nxt = sample_next(logits, temperature, top_k, top_p, generator)   # [B]
        out.append(nxt)
        if on_token is not None:
            on_token(nxt)
        if len(out) == max_new_tokens:
            break
        logits = model(nxt[:, None], cache=cache)[:, -1]
    sync()
    t2 = time.perf_counter()
    stats = {"prefill_tok_s": B * T / max(t1 - t0, 1e-9),
             "decode_tok_s": B * max(len(out) - 1, 0) / max(t2 - t1, 1e-9),
             "cache_bytes": cache.nbytes(), "context": T + len(out)}
    return torch.stack(out, 1), stats


class Streamer:
    """Prints tokens as they come, holding back bytes that do not yet form complete UTF-8."""

    def __init__(self, enc):
        self.enc, self.ids, self.printed = enc, [], 0

    def __call__(self, token: torch.Tensor):
        self.ids.append(int(token[0]))
        text = self.enc.decode_bytes(self.ids).decode("utf-8", errors="ignore")
        if not text.endswith("\ufffd"):
            sys.stdout.write(text[self.printed:])
            sys.stdout.flush()
            self.printed = len(text)


def main(argv=None):
    args = parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    state = load_checkpoint(args.ckpt)
    state["config"].update(fp8=args.fp8 or state["config"]["fp8"], kernels=args.kernels,
                           index_fp8=args.index_fp8 or state["config"].get("index_fp8", False))
    if args.max_seq_len is not None:
        if args.max_seq_len < 1:
            raise SystemExit(f"--max-seq-len must be positive, got {args.max_seq_len}")
        state["config"]["max_seq_len"] = args.max_seq_len
    model, enc = model_from_checkpoint(state, device)
    for m in model.modules():            # sampling never changes the weights: quantise them once
        if hasattr(m, "cache_weight"):
            m.cache_weight = True
    if device.type == "cuda" and args.dtype == "bf16":
        model = model.to(torch.bfloat16)
    print(model.accounting(min(model.cfg.max_seq_len, 4096)), file=sys.stderr)

    text = open(args.prompt_file, encoding="utf-8").read() if args.prompt_file else args.prompt
    bos = enc.encode_single_token("<|bos|>")
    ids = [bos] + enc.encode_ordinary(text)
    if len(ids) + args.max_new_tokens > model.cfg.max_seq_len:
        raise SystemExit(f"prompt of {len(ids)} tokens + --max-new-tokens {args.max_new_tokens} exceeds "
                         f"the model's max_seq_len of {model.cfg.max_seq_len} (--max-seq-len raises it)")
    prompt = torch.tensor([ids], device=device)
    for i in range(args.num_samples):
        sys.stdout.write(text)
        streamer = Streamer(enc)
        _, stats = generate(model, prompt, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                            args.prefill_chunk, args.seed + i, on_token=streamer)
        print("\n" + "-" * 60)
        print(f"prefill {len(ids)} tokens at {stats['prefill_tok_s']:,.0f} tok/s | decode "
              f"{args.max_new_tokens} tokens at {stats['decode_tok_s']:,.1f} tok/s | cache "
              f"{stats['cache_bytes'] / 2**20:.2f} MiB at {stats['context']} tokens", file=sys.stderr)


if __name__ == "__main__":
    main()
