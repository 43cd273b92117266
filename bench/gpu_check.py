"""CUDA-only checks that the CPU test suite cannot make (run on a GPU before trusting its numbers):

  1. the model with the Triton CSA kernels (selection + sparse attention) equals the model with the
     PyTorch reference (ModelConfig.kernels = "reference"), on the small preset's real shapes;
  2. chunked prefill + token-by-token decode equals the full forward on CUDA in bf16, with the kernels;
  3. --fp8 (Triton FP8 GEMM) stays within FP8 rounding of the bf16 model, forward and backward;
  4. the MoE grouped GEMM (torch._grouped_mm) equals the per-expert loop inside a whole model step;
  5. the FP8 indexer (ModelConfig.index_fp8): kernels vs reference, decode from its e4m3 cache.

    python bench/gpu_check.py
Prints one line per check and exits non-zero if one fails.
"""

import sys

import torch

sys.path.insert(0, __file__.rsplit("/bench/", 1)[0])
from model import ModelConfig, Transformer  # noqa: E402


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def main():
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    torch.manual_seed(0)
    failures = []

    def check(name, value, bound):
        ok = value < bound
        failures.extend([] if ok else [name])
        print(f"{'ok  ' if ok else 'FAIL'} {name}: {value:.3g} (bound {bound})", flush=True)

    cfg = ModelConfig.from_preset("small", vocab_size=8192, max_seq_len=4096)
    model = Transformer(cfg).cuda().eval()
    x = torch.randint(0, 8192, (2, 2048), device="cuda")

    @torch.no_grad()
    def kernels_against_reference(dtype, bound):
        kern = model(x)
        model.cfg.kernels = "reference"
        ref = model(x)
        model.cfg.kernels = "auto"
        check(f"kernels vs reference, small preset, T=2048, {dtype} logits", rel(kern, ref), bound)
        return kern

    kernels_against_reference("fp32", 1e-3)       # the exactness check: measured 8e-7 to 1.5e-4
    model = model.to(torch.bfloat16)
    # in bf16 the two paths round differently and 12 random layers amplify it: 0.0193 measured in the
    # second session, 0.0211-0.0215 since the fused Sinkhorn (fp32, equal to the loop to 2e-6) is used
    kern = kernels_against_reference("bf16", 3e-2)
    with torch.no_grad():
        cache = model.new_cache(2)
        parts = [model(x[:, :700], cache=cache), model(x[:, 700:1500], cache=cache)]
        parts += [model(x[:, t:t + 1], cache=cache) for t in range(1500, 1532)]
        check("chunked prefill + decode vs forward (kernels, bf16)", rel(torch.cat(parts, 1), kern[:, :1532]), 2e-2)

    # the FP8 indexer (ModelConfig.index_fp8): its kernels (FP8 tensor cores) against the reference on the
    # same e4m3 values; decode from the e4m3 cache against the full forward; and how far FP8 selection
    # moves the logits from the bf16 indexer's (other entries chosen where scores nearly tie; a wrong
    # scale would choose at random)
    model.cfg.index_fp8 = True
    kern8 = kernels_against_reference("bf16 (FP8 indexer)", 3e-2)
    with torch.no_grad():
        cache = model.new_cache(2)
        parts = [model(x[:, :700], cache=cache), model(x[:, 700:1500], cache=cache)]
        parts += [model(x[:, t:t + 1], cache=cache) for t in range(1500, 1532)]
        check("chunked prefill + decode vs forward (kernels, bf16, FP8 indexer)",
              rel(torch.cat(parts, 1), kern8[:, :1532]), 2e-2)
    check("FP8 indexer vs bf16 indexer, logits", rel(kern8, kern), 0.3)
    model.cfg.index_fp8 = False

    # fp8: same weights, fp32 master weights under bf16 autocast as in training
    small = dict(vocab_size=8192, max_seq_len=1024, n_layers=4, compress_ratios=(0, 4, 128, 4))
    torch.manual_seed(0)
    base = Transformer(ModelConfig.from_preset("small", **small)).cuda()
    fp8 = Transformer(ModelConfig.from_preset("small", fp8=True, **small)).cuda()
    fp8.load_state_dict(base.state_dict())
    x = torch.randint(0, 8192, (4, 1024), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        la, loss_a = base(x, x)
        lb, loss_b = fp8(x, x)
    loss_a.backward()
    loss_b.backward()
    check("fp8 vs bf16 logits", rel(lb, la), 0.2)
    # measured 0.27 with the attention and shared experts in FP8, 0.31 since the routed experts and wo_a
    # are too (more FP8 rounding upstream, and router choices it flips); a wrong scale or layout gives ~1
    check("fp8 vs bf16 grad of layers.1.attn.wq_b", rel(fp8.layers[1].attn.wq_b.weight.grad,
                                                        base.layers[1].attn.wq_b.weight.grad), 0.4)

    # grouped GEMM vs loop inside a model step
    for m in base.moe_layers():
        m.dispatch = "loop"
    base.zero_grad()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        lc, loss_c = base(x, x)
    loss_c.backward()
    check("MoE grouped GEMM vs per-expert loop, logits", rel(la, lc), 2e-2)
    print("all CUDA checks passed" if not failures else f"FAILED: {failures}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
