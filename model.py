"""The DeepSeek V4 model: its configuration, presets, and (below) the Transformer.

ModelConfig field names follow the official inference code's `ModelArgs` so that our config can be
held next to the published `config.json`. Three ablation switches select the baselines that every
V4 claim is compared against:
    attention  "v4"   hybrid CSA / HCA / sliding window with sinks   | "full"  attend every earlier token
    ffn        "moe"  DeepSeekMoE (hash + routed experts, shared)    | "dense" SwiGLU MLP, same active size
    residual   "mhc"  manifold-constrained hyper-connections         | "plain" x + F(norm(x))
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from attention import Attention, RMSNorm
from mhc import composite_gain, expand_streams, hc_head, hc_head_init, hc_init, hc_post, hc_pre
from moe import Expert, MoE, out_proj_std


@dataclass
class ModelConfig:
    # --- sizes ---------------------------------------------------------------------------------
    vocab_size: int = 4096
    dim: int = 128                       # d, the model width
    n_layers: int = 4
    norm_eps: float = 1e-6
    max_seq_len: int = 1024              # longest sequence the caches and RoPE tables accept
    # --- attention (V4-REFERENCE section 1) -----------------------------------------------------
    n_heads: int = 4                     # n_h query heads; one shared K == V head
    head_dim: int = 32                   # c
    rope_head_dim: int = 16              # r: RoPE on the LAST r dims of each head
    q_lora_rank: int = 64                # the query latent, shared with the lightning indexer
    o_groups: int = 2                    # heads are split into groups for the output projection
    o_lora_rank: int = 64                # per-group rank of wo_a
    window_size: int = 16                # n_win: positions t-n_win+1 .. t
    compress_ratios: tuple = (0, 4, 16, 4)   # per layer: 0 = window only, 4 = CSA, else HCA (128 in V4)
    rope_theta: float = 10000.0          # window-only layers, no YaRN
    compress_rope_theta: float = 160000.0  # compressed layers, with YaRN
    rope_factor: float = 16.0            # YaRN
    original_seq_len: int = 65536        # YaRN
    beta_fast: int = 32                  # YaRN
    beta_slow: int = 1                   # YaRN
    index_n_heads: int = 4               # lightning indexer heads (64 in V4)
    index_head_dim: int = 16             # lightning indexer head dim (128 in V4)
    index_topk: int = 4                  # compressed entries chosen per query in CSA layers
    # --- MoE (section 2) --------------------------------------------------------------------------
    n_routed_experts: int = 8
    n_shared_experts: int = 1
    n_activated_experts: int = 2
    moe_inter_dim: int = 64
    n_hash_layers: int = 1               # the first layers route by a fixed token-id table
    route_scale: float = 1.5
    swiglu_limit: float = 10.0
    score_func: str = "sqrtsoftplus"
    # --- mHC (section 3) --------------------------------------------------------------------------
    hc_mult: int = 4                     # n residual streams
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    # --- MTP (section 6) --------------------------------------------------------------------------
    n_mtp_layers: int = 1                # depth of multi-token prediction (0 = off)
    # --- ablation switches and training stages (ours, not in ModelArgs) --------------------------
    attention: str = "v4"                # "v4" | "full"
    ffn: str = "moe"                     # "moe" | "dense"
    residual: str = "mhc"                # "mhc" | "plain"
    csa_stage: str = "sparse"            # "dense": attend all visible entries (V4's early stage);
                                         # "warmup": indexer-only warm-up; "sparse": top-k (default)
    init_std: float = 0.02
    kernels: str = "auto"                # "auto": Triton kernels on CUDA; "reference": plain PyTorch
    fp8: bool = False                    # FP8 block-scaled GEMM for the attention / expert projections
    index_fp8: bool = False              # the top-k's indexer keys (cached) and queries in FP8 e4m3, one
                                         # power-of-two scale per row (V3.2's indexer; V4's runs in FP4)

    CHOICES = {
        "attention": ("v4", "full"),
        "ffn": ("moe", "dense"),
        "residual": ("mhc", "plain"),
        "csa_stage": ("dense", "warmup", "sparse"),
        "kernels": ("auto", "reference"),
        "score_func": ("sqrtsoftplus",),
    }

    def __post_init__(self):
        self.compress_ratios = tuple(int(r) for r in self.compress_ratios)
        positive = ["vocab_size", "dim", "n_layers", "max_seq_len", "n_heads", "head_dim",
                    "rope_head_dim", "q_lora_rank", "o_groups", "o_lora_rank", "window_size",
                    "index_n_heads", "index_head_dim", "index_topk", "n_routed_experts",
                    "n_activated_experts", "moe_inter_dim", "hc_mult", "hc_sinkhorn_iters"]
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        for name in ["n_shared_experts", "n_hash_layers", "n_mtp_layers"]:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"ModelConfig.{name} must be a non-negative integer, got {value!r}")
        for name in ["norm_eps", "rope_theta", "compress_rope_theta", "rope_factor", "route_scale",
                     "swiglu_limit", "hc_eps", "init_std"]:
            if not getattr(self, name) > 0:
                raise ValueError(f"ModelConfig.{name} must be > 0, got {getattr(self, name)!r}")
        for name, allowed in self.CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"ModelConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if len(self.compress_ratios) != self.n_layers:
            raise ValueError(f"ModelConfig.compress_ratios has {len(self.compress_ratios)} entries "
                             f"but n_layers = {self.n_layers}: give one ratio per layer")
        for r in self.compress_ratios:
            if r < 0 or r == 1:
                raise ValueError(f"ModelConfig.compress_ratios: {r} is not 0 (window only) or a "
                                 f"compression ratio >= 2")
        if self.head_dim % 2 or self.rope_head_dim % 2 or self.rope_head_dim > self.head_dim:
            raise ValueError(f"ModelConfig.rope_head_dim ({self.rope_head_dim}) must be even and at "
                             f"most head_dim ({self.head_dim}), which must be even")
        if not isinstance(self.index_fp8, bool) or (self.index_fp8 and self.index_head_dim > 128):
            raise ValueError(f"ModelConfig.index_fp8 must be a bool, and needs index_head_dim <= 128 (one "
                             f"1x128 scale block per row), got {self.index_fp8!r}, {self.index_head_dim}")
        if self.rope_head_dim > self.index_head_dim:
            raise ValueError(f"ModelConfig.index_head_dim ({self.index_head_dim}) must be at least "
                             f"rope_head_dim ({self.rope_head_dim})")
        if self.n_heads % self.o_groups:
            raise ValueError(f"ModelConfig.o_groups ({self.o_groups}) must divide n_heads ({self.n_heads})")
        if self.n_activated_experts > self.n_routed_experts:
            raise ValueError(f"ModelConfig.n_activated_experts ({self.n_activated_experts}) exceeds "
                             f"n_routed_experts ({self.n_routed_experts})")
        if self.n_hash_layers > self.n_layers:
            raise ValueError(f"ModelConfig.n_hash_layers ({self.n_hash_layers}) exceeds n_layers ({self.n_layers})")
        if self.n_mtp_layers > 1:
            raise ValueError(f"ModelConfig.n_mtp_layers: V4 uses depth 1; got {self.n_mtp_layers}")

    # derived sizes
    @property
    def dense_inter_dim(self) -> int:
        """Hidden size of the dense twin: the same active FFN parameters as routed top-k + shared."""
        return (self.n_activated_experts + self.n_shared_experts) * self.moe_inter_dim

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "ModelConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise ValueError(f"unknown ModelConfig field(s) {unknown}")
        return cls(**{**PRESETS[name], **overrides})

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["compress_ratios"] = list(self.compress_ratios)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ValueError(f"unknown ModelConfig field(s) {unknown}")
        return cls(**d)


PRESETS = {
    # CPU tests and the README's main job. Every layer type (window / CSA m=4 / HCA m=16), a window of
    # 16 that a 100-token test evicts, 6 HCA entries at T=100 and top-4 of up to 25 CSA entries.
    "nano": dict(),
    # One H200: the official layer pattern [0, 0] + [4, 128] * k scaled down.
    "small": dict(vocab_size=8192, dim=768, n_layers=12, max_seq_len=65536, n_heads=12, head_dim=128,
                  rope_head_dim=32, q_lora_rank=384, o_groups=4, o_lora_rank=256, window_size=128,
                  compress_ratios=(0, 0) + (4, 128) * 5, index_n_heads=16, index_head_dim=64,
                  index_topk=256, n_routed_experts=16, n_shared_experts=1, n_activated_experts=2,
                  moe_inter_dim=1024, n_hash_layers=2, route_scale=1.5),
    # The official configurations (V4-REFERENCE section 8), for counting on the meta device.
    "flash": dict(vocab_size=129280, dim=4096, n_layers=43, max_seq_len=1048576, n_heads=64,
                  head_dim=512, rope_head_dim=64, q_lora_rank=1024, o_groups=8, o_lora_rank=1024,
                  window_size=128, compress_ratios=(0, 0) + (4, 128) * 20 + (4,), index_n_heads=64,
                  index_head_dim=128, index_topk=512, n_routed_experts=256, n_shared_experts=1,
                  n_activated_experts=6, moe_inter_dim=2048, n_hash_layers=3, route_scale=1.5),
    "pro": dict(vocab_size=129280, dim=7168, n_layers=61, max_seq_len=1048576, n_heads=128,
                head_dim=512, rope_head_dim=64, q_lora_rank=1536, o_groups=16, o_lora_rank=1024,
                window_size=128, compress_ratios=(128, 128) + (4, 128) * 29 + (4,), index_n_heads=64,
                index_head_dim=128, index_topk=1024, n_routed_experts=384, n_shared_experts=1,
                n_activated_experts=6, moe_inter_dim=3072, n_hash_layers=3, route_scale=2.5),
}


# ================================================================================================
# The Transformer
# ================================================================================================

FP8_LAYERS = re.compile(r"\.attn\.(wq_a|wq_b|wkv|wo_b)$|\.(shared_experts|ffn)\.w[123]$")


def use_fp8(model: nn.Module, cfg: ModelConfig) -> list[str]:
    """--fp8: the attention projections (wq_a, wq_b, wkv, wo_b, and wo_a group by group), the shared /
    dense expert projections and the routed experts (through the grouped form:
    `moe.expert_dispatch(impl="fp8")`) run through the block-scaled FP8 GEMM (kernels/fp8_gemm.py,
    Triton on CUDA). The embedding, head, norms, mHC, the gate and the compressor / indexer projections
    (fp32 in V4) stay in higher precision. Returns what runs in FP8."""
    from kernels.fp8_gemm import convert_to_fp8
    reference = cfg.kernels == "reference"
    names = convert_to_fp8(model, include=lambda name, _: FP8_LAYERS.search(name) is not None,
                           impl="reference" if reference else "auto")
    for name, module in model.named_modules():
        if isinstance(module, MoE):
            module.dispatch = "fp8-reference" if reference else "fp8"
            names += [f"{name}.w{i}" for i in (1, 2, 3)]
        elif isinstance(module, Attention):
            module.wo_a_fp8 = "reference" if reference else "auto"
            names.append(f"{name}.wo_a")
    return names


class Block(nn.Module):
    """One V4 layer: attention and FFN, each wrapped by mHC (or a plain residual).

    mHC (V4-REFERENCE section 3), for a sublayer F with parameters hc_*_{fn,base,scale}:
        u, post, res = hc_pre(X)            # u = sum_i pre_i X_i                  [B, T, d]
        X' = post * F(norm(u)) + res^T X    # n streams in, n streams out         [B, T, n, d]
    Plain residual: x' = x + F(norm(x)).
    """

    def __init__(self, cfg: ModelConfig, layer_id: int, compress_ratio: int | None = None,
                 hash_routing: bool | None = None):
        super().__init__()
        self.cfg = cfg
        self.layer_id = layer_id
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg, layer_id, compress_ratio)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        if cfg.ffn == "moe":
            self.ffn = MoE(cfg, layer_id, hash_routing)
        else:
            self.ffn = Expert(cfg.dim, cfg.dense_inter_dim, cfg.swiglu_limit, cfg.init_std, out_proj_std(cfg))
        if cfg.residual == "mhc":
            self.hc_attn_fn, self.hc_attn_base, self.hc_attn_scale = hc_init(cfg)
            self.hc_ffn_fn, self.hc_ffn_base, self.hc_ffn_scale = hc_init(cfg)
        self.res_record = None   # list to append the mHC residual matrices to (diagnostics)
        self.activation_checkpointing = False   # recompute this block in the backward pass

    def _ffn(self, x, token_ids):
        return self.ffn(x, token_ids) if self.cfg.ffn == "moe" else self.ffn(x)

    def forward(self, x, token_ids, cache=None):
        if self.activation_checkpointing and self.training and cache is None:
            return torch.utils.checkpoint.checkpoint(self._forward, x, token_ids, use_reentrant=False)
        return self._forward(x, token_ids, cache)

    def _forward(self, x, token_ids, cache=None):
        # x: [B, T, n, d] with mHC, [B, T, d] with the plain residual
        if self.cfg.residual == "plain":
            x = x + self.attn(self.attn_norm(x), cache)
            return x + self._ffn(self.ffn_norm(x), token_ids)
        u, post, res = hc_pre(x, self.hc_attn_fn, self.hc_attn_scale, self.hc_attn_base, self.cfg)
        x = hc_post(self.attn(self.attn_norm(u), cache), x, post, res)
        if self.res_record is not None:
            self.res_record.append(res.detach())
        u, post, res = hc_pre(x, self.hc_ffn_fn, self.hc_ffn_scale, self.hc_ffn_base, self.cfg)
        x = hc_post(self._ffn(self.ffn_norm(u), token_ids), x, post, res)
        if self.res_record is not None:
            self.res_record.append(res.detach())
        return x


class MTPBlock(Block):
    """Multi-token prediction, depth 1 (V4-REFERENCE section 6; official `mtp.0.*`).

    At position i it combines the main model's last hidden streams h_i with the embedding of token
    i+1 and predicts token i+2:
        x = e_proj(enorm(embed(t_{i+1}))) + h_proj(hnorm(h_i))    (broadcast over the n streams)
        x = Block(x)            window-only attention, non-hash MoE, mHC
        logits = head(norm(hc_head(x)))   with its own hc_head_* and norm, the shared head.
    """

    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__(cfg, layer_id, compress_ratio=0, hash_routing=False)
        self.e_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.h_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.enorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.hnorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        if cfg.residual == "mhc":
            self.hc_head_fn, self.hc_head_base, self.hc_head_scale = hc_head_init(cfg)

    def forward(self, h, next_emb, token_ids):
        e = self.e_proj(self.enorm(next_emb))                 # [B, T, d]
        if self.cfg.residual == "mhc":
            e = e.unsqueeze(-2)                               # [B, T, 1, d] broadcast over streams
        x = super().forward(e + self.h_proj(self.hnorm(h)), token_ids)
        if self.cfg.residual == "mhc":
            x = hc_head(x, self.hc_head_fn, self.hc_head_scale, self.hc_head_base, self.cfg)
        return self.norm(x)                                   # [B, T, d]


class ModelCache:
    """Per-layer attention caches plus the number of tokens seen; made by `Transformer.new_cache`."""

    def __init__(self, layers, batch_size):
        self.layers = layers
        self.batch_size = batch_size
        self.pos = 0

    def nbytes(self) -> int:
        """Bytes held by every tensor of every layer's cache (window rings, compressor states,
        compressed entries and indexer keys, including the spare capacity of growing buffers)."""
        def walk(obj):
            if torch.is_tensor(obj):
                return obj.numel() * obj.element_size()
            if isinstance(obj, nn.Module):          # a cache may point at its compressor's weights
                return 0
            if isinstance(obj, (list, tuple)):
                return sum(walk(o) for o in obj)
            return sum(walk(v) for v in vars(obj).values()) if hasattr(obj, "__dict__") else 0
        return walk(self.layers)


class Transformer(nn.Module):
    """embed -> (n streams) -> blocks -> hc_head -> norm -> head, plus the MTP block for training.

    `model(tokens)` returns logits [B, T, vocab]; `model(tokens, targets)` returns (logits, loss),
    the loss being what the optimiser minimises: next-token CE + mtp_loss_weight * MTP CE + the MoE
    sequence balance losses + the indexer KL losses. The parts are kept in `self.metrics`.
    `model(tokens, cache=cache)` feeds the next tokens of a sequence and advances the cache.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        if cfg.residual == "mhc":
            self.hc_head_fn, self.hc_head_base, self.hc_head_scale = hc_head_init(cfg)
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.mtp = nn.ModuleList(MTPBlock(cfg, cfg.n_layers + i) for i in range(cfg.n_mtp_layers))
        self.mtp_loss_weight = 0.3            # V4: 0.3, then 0.1 once the learning rate decays
        self.metrics: dict = {}
        # Each mechanism module initialises its own parameters (attention.py, moe.py, mhc.py);
        # here the embedding, the head and the MTP projections: normal(0, init_std).
        for w in [self.embed.weight, self.head.weight] + [p for m in self.mtp for p in
                                                           (m.e_proj.weight, m.h_proj.weight)]:
            nn.init.normal_(w, mean=0.0, std=cfg.init_std)
        if cfg.fp8:
            self.fp8_layers = use_fp8(self, cfg)

    # -- forward ---------------------------------------------------------------------------------
    def new_cache(self, batch_size: int, device=None, dtype=None) -> ModelCache:
        device = device or self.embed.weight.device
        dtype = dtype or self.embed.weight.dtype
        return ModelCache([layer.attn.new_cache(batch_size, device, dtype) for layer in self.layers],
                          batch_size)

    def forward(self, tokens, targets=None, cache: ModelCache | None = None):
        B, T = tokens.shape
        if cache is not None:
            if B != cache.batch_size:
                raise ValueError(f"batch of {B} sequences fed to a cache made for {cache.batch_size}")
            if cache.pos + T > self.cfg.max_seq_len:
                raise ValueError(f"sequence of {cache.pos + T} tokens exceeds max_seq_len = "
                                 f"{self.cfg.max_seq_len}")
        elif T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {T} tokens exceeds max_seq_len = {self.cfg.max_seq_len}")
        for moe in self.moe_layers():                         # only this forward's balance losses count
            moe.aux_loss = None
        h = self.embed(tokens)                                # [B, T, d]
        if self.cfg.residual == "mhc":
            h = expand_streams(h, self.cfg.hc_mult)           # [B, T, n, d]
        for i, layer in enumerate(self.layers):
            h = layer(h, tokens, None if cache is None else cache.layers[i])
        if cache is not None:
            cache.pos += T
        logits = self.head(self._final(h))                    # [B, T, vocab]
        if targets is None:
            return logits
        return logits, self._loss(logits, h, targets)

    def _final(self, h):
        if self.cfg.residual == "mhc":
            h = hc_head(h, self.hc_head_fn, self.hc_head_scale, self.hc_head_base, self.cfg)
        return self.norm(h)

    def _loss(self, logits, h, targets):
        ce = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-1)
        loss = ce
        metrics = {"ce": ce.detach()}
        if len(self.mtp) and self.mtp_loss_weight > 0:
            # MTP at position i sees h_i and the embedding of token i+1 (= targets[i]), predicts
            # targets[i+1]; the last position has no target.
            next_emb = self.embed(targets.clamp(min=0))
            x = self.mtp[0](h, next_emb, targets.clamp(min=0))
            mtp_targets = F.pad(targets[:, 1:], (0, 1), value=-1)
            mtp_logits = self.head(x)
            mtp = F.cross_entropy(mtp_logits.float().flatten(0, 1), mtp_targets.flatten(), ignore_index=-1)
            loss = loss + self.mtp_loss_weight * mtp
            metrics["mtp"] = mtp.detach()
        aux = [m.aux_loss for m in self.modules() if isinstance(m, MoE) and m.aux_loss is not None]
        if aux:
            balance = torch.stack([a.float() for a in aux]).sum()
            loss = loss + balance
            metrics["balance"] = balance.detach()
        kl = [m.indexer_loss for m in self.modules()
              if isinstance(m, Attention) and getattr(m, "indexer_loss", None) is not None]
        if kl:
            kl_sum = torch.stack([k.float() for k in kl]).sum()
            loss = loss + kl_sum
            metrics["indexer_kl"] = kl_sum.detach()
        self.metrics = metrics
        return loss

    # -- MoE balancing and diagnostics -----------------------------------------------------------
    def moe_layers(self):
        return [m for m in self.modules() if isinstance(m, MoE)]

    @torch.no_grad()
    def update_moe_bias(self, gamma: float = 1e-3, all_reduce=None):
        """The aux-loss-free balancing step; call right after optimizer.step().

        `all_reduce` (for FSDP) sums the expert loads over ranks before the update: every layer's in one
        collective (one call per layer would be 13 latency-bound calls a step for the small preset).
        """
        layers = self.moe_layers()
        if all_reduce is not None and layers:
            loads = torch.cat([moe.load for moe in layers])                   # [sum of E]
            all_reduce(loads)
            for moe, summed in zip(layers, loads.split([moe.load.numel() for moe in layers])):
                moe.load.copy_(summed)
        for moe in layers:
            moe.update_bias(gamma)

    @torch.no_grad()
    def diagnostics(self, tokens) -> dict:
        """Expert load statistics and the mHC composite gain on one batch (for the training log)."""
        out = {}
        loads = [m.load_stats() for m in self.moe_layers()]
        loads = [s for s in loads if s]
        if loads:
            out["moe_max_over_mean"] = max(s["max_over_mean"] for s in loads)
            out["moe_cv"] = sum(s["cv"] for s in loads) / len(loads)
        if self.cfg.residual == "mhc":
            record = []
            for layer in self.layers:
                layer.res_record = record
            was_training = self.training
            self.eval()
            try:
                self(tokens)
            finally:
                self.train(was_training)
                for layer in self.layers:
                    layer.res_record = None
            out["mhc_gain"] = composite_gain(record)
        return out

    # -- accounting ------------------------------------------------------------------------------
    def num_params(self, active: bool = False, embedding: bool = True, mtp: bool = True) -> int:
        """Parameters, counted unquantised. active=True counts the routed experts a token uses."""
        total = 0
        for name, p in self.named_parameters():
            if not embedding and name == "embed.weight":
                continue
            if not mtp and name.startswith("mtp."):
                continue
            total += p.numel()
        if active:
            for name, m in self.named_modules():
                if isinstance(m, MoE) and (mtp or not name.startswith("mtp.")):
                    routed = sum(w.numel() for w in m.parameters(recurse=False))  # stacked experts
                    total -= routed - routed * self.cfg.n_activated_experts // self.cfg.n_routed_experts
        return total

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 x active matmul parameters + 3 x the attention core (forward)."""
        matmul = self.num_params(active=True, embedding=False, mtp=True)
        attn = sum(layer.attn.attention_flops(seq_len) for layer in self.layers)
        attn += sum(m.attn.attention_flops(seq_len) for m in self.mtp)
        return 6.0 * matmul + 3.0 * attn

    def kv_bytes_per_token(self, context: int) -> float:
        return sum(layer.attn.cache_bytes(context) for layer in self.layers) / context

    def accounting(self, seq_len: int, context: int | None = None) -> str:
        """One paragraph for the start of training and sampling, beside the full-attention twin."""
        context = context or seq_len
        lines = [f"parameters: {self.num_params() / 1e6:.2f}M total, "
                 f"{self.num_params(active=True, embedding=False, mtp=False) / 1e6:.2f}M active "
                 f"(without embedding and MTP)",
                 f"training FLOPs/token at T={seq_len}: {self.flops_per_token(seq_len) / 1e6:.2f}M",
                 f"KV cache at T={context}: {self.kv_bytes_per_token(context):.0f} bytes/token"]
        if self.cfg.attention == "v4":
            with torch.device("meta"):
                twin = Transformer(dataclasses.replace(self.cfg, attention="full"))
            lines[1] += f" (full-attention twin {twin.flops_per_token(seq_len) / 1e6:.2f}M)"
            lines[2] += f" (full-attention twin {twin.kv_bytes_per_token(context):.0f})"
        return "\n".join(lines)

    # -- the official checkpoint layout ----------------------------------------------------------
    def official_state_dict(self) -> dict:
        """Every tensor under its official V4 name and shape, unquantised: our names already are the
        official ones except the routed experts, stored stacked here and exported one by one as
        `layers.N.ffn.experts.E.{w1,w2,w3}.weight`."""
        if (self.cfg.attention, self.cfg.ffn, self.cfg.residual) != ("v4", "moe", "mhc"):
            raise ValueError("the official layout exists for the V4 model only (attention='v4', "
                             "ffn='moe', residual='mhc'), not for the ablation twins")
        sd = self.state_dict()
        for name, moe in self.named_modules():
            if isinstance(moe, MoE):
                for key in ("w1", "w2", "w3"):
                    del sd[f"{name}.{key}"]
                sd.update({f"{name}.{k}": v for k, v in moe.export_experts().items()})
        return sd

    def load_official_state_dict(self, sd: dict) -> None:
        """Import a dict in the official layout; a missing, unexpected or mis-shaped tensor raises a
        ValueError naming the first such key."""
        ours = self.official_state_dict()
        for key, value in ours.items():
            if key not in sd:
                raise ValueError(f"official state dict lacks {key!r}")
            if tuple(sd[key].shape) != tuple(value.shape):
                raise ValueError(f"official state dict: {key!r} has shape {tuple(sd[key].shape)}, "
                                 f"the model expects {tuple(value.shape)}")
        unexpected = sorted(set(sd) - set(ours))
        if unexpected:
            raise ValueError(f"official state dict has unexpected key {unexpected[0]!r}")
        experts = {name: {k[len(name) + 1:]: v for k, v in sd.items() if k.startswith(name + ".experts.")}
                   for name, m in self.named_modules() if isinstance(m, MoE)}
        plain = {k: v for k, v in sd.items() if ".experts." not in k}
        missing, _ = self.load_state_dict(plain, strict=False)
        stacked = {f"{name}.{w}" for name in experts for w in ("w1", "w2", "w3")}
        assert set(missing) == stacked, set(missing) ^ stacked
        for name, m in self.named_modules():
            if isinstance(m, MoE):
                m.import_experts(experts[name])


OFFICIAL_CONFIG_FIELDS = ["vocab_size", "dim", "moe_inter_dim", "n_layers", "n_hash_layers", "n_heads",
                          "n_routed_experts", "n_shared_experts", "n_activated_experts", "score_func",
                          "route_scale", "swiglu_limit", "q_lora_rank", "head_dim", "rope_head_dim",
                          "norm_eps", "o_groups", "o_lora_rank", "window_size", "compress_ratios",
                          "compress_rope_theta", "rope_theta", "rope_factor", "original_seq_len",
                          "beta_fast", "beta_slow", "index_n_heads", "index_head_dim", "index_topk",
                          "hc_mult", "hc_sinkhorn_iters", "hc_eps", "max_seq_len"]


def export_official(ckpt_path: str, out_dir: str) -> None:
    """checkpoint -> out_dir/model.safetensors + out_dir/config.json in the official ModelArgs names
    (compress_ratios carries the MTP block's trailing 0 as the published configs do)."""
    import json
    import os
    try:
        from safetensors.torch import save_file
    except ImportError:
        raise SystemExit("export needs safetensors, an optional dependency: pip install safetensors")
    from train import load_checkpoint, model_from_checkpoint
    model, _ = model_from_checkpoint(load_checkpoint(ckpt_path))
    sd = {k: v.contiguous() for k, v in model.official_state_dict().items()}
    cfg = model.cfg.to_dict()
    config = {k: cfg[k] for k in OFFICIAL_CONFIG_FIELDS}
    config["compress_ratios"] = list(cfg["compress_ratios"]) + [0] * model.cfg.n_mtp_layers
    config["n_mtp_layers"] = model.cfg.n_mtp_layers
    os.makedirs(out_dir, exist_ok=True)
    save_file(sd, os.path.join(out_dir, "model.safetensors"))
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    print(f"wrote {len(sd)} tensors to {out_dir}/model.safetensors and {out_dir}/config.json")


def main(argv=None):
    import argparse
    p = argparse.ArgumentParser(description="Model accounting and the official checkpoint layout.")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("count", help="parameters, FLOPs and KV-cache bytes of a preset (meta device)")
    c.add_argument("preset", choices=sorted(PRESETS))
    c.add_argument("--seq-len", type=int, default=4096, help="training length for the FLOPs")
    c.add_argument("--context", type=int, default=1048576, help="context length for the KV cache")
    e = sub.add_parser("export", help="checkpoint -> model.safetensors + config.json (official names)")
    e.add_argument("ckpt")
    e.add_argument("out_dir")
    args = p.parse_args(argv)
    if args.command == "count":
        with torch.device("meta"):
            model = Transformer(ModelConfig.from_preset(args.preset))
        print(f"{args.preset}: {model.num_params(mtp=False) / 1e6:,.2f}M total without MTP "
              f"({model.num_params() / 1e6:,.2f}M with it)")
        print(model.accounting(args.seq_len, args.context))
    else:
        export_official(args.ckpt, args.out_dir)


if __name__ == "__main__":
    main()
