"""A decoder-only Transformer language model written from scratch (CS336 assignment 1), with research switches.

The standard model is pre-norm RMSNorm, RoPE, SwiGLU, causal multi-head attention, untied embeddings.
Switches, all off by default: norm ('pre'|'post'|'none'), pos ('rope'|'none' = NoPE), ffn ('swiglu'|'silu'),
qk_norm, n_kv_heads (grouped-query / multi-query attention), logit_softcap, tie_embeddings, block ('serial'|'parallel').

    model = TransformerLM(vocab_size=10_000, context_length=256, d_model=512, num_layers=4, num_heads=16, d_ff=1344)
    logits = model(idx)                       # idx (batch, seq) int64 -> (batch, seq, vocab)
    ce, z = model.loss(idx, targets)          # training loss = ce + z_loss * z

`python model.py config/tinystories.py [--key=value ...]` prints parameters, FLOPs and training memory for a config.
"""
import copy
import math

import torch
from torch import Tensor
from torch.nn import Module, ModuleList, Parameter

import kernels

MODEL_KEYS = ("vocab_size", "context_length", "d_model", "num_layers", "num_heads", "d_ff", "rope_theta", "norm", "pos",
              "ffn", "qk_norm", "n_kv_heads", "logit_softcap", "tie_embeddings", "block", "norm_eps")
KERNEL_OPS = ("rmsnorm", "swiglu", "attention", "cross_entropy")  # what use_kernels() can route through kernels.py
CHOICES = {"norm": ("pre", "post", "none"), "pos": ("rope", "none"), "ffn": ("swiglu", "silu"),
           "block": ("serial", "parallel")}


def model_config(vocab_size: int, context_length: int, d_model: int, num_layers: int, num_heads: int,
                 d_ff: int | None = None, rope_theta: float = 10000.0, norm: str = "pre", pos: str = "rope",
                 ffn: str = "swiglu", qk_norm: bool = False, n_kv_heads: int | None = None, logit_softcap: float = 0.0,
                 tie_embeddings: bool = False, block: str = "serial", norm_eps: float = 1e-5) -> dict:
    """Check a model shape and fill in d_ff and n_kv_heads; the result rebuilds the model: TransformerLM(**cfg)."""
    for key, value in (("norm", norm), ("pos", pos), ("ffn", ffn), ("block", block)):
        if value not in CHOICES[key]:
            raise ValueError(f"{key}={value!r} is not allowed; use one of {', '.join(map(repr, CHOICES[key]))}")
    sizes = {"vocab_size": vocab_size, "context_length": context_length, "d_model": d_model, "num_layers": num_layers,
             "num_heads": num_heads, "d_ff": d_ff, "n_kv_heads": n_kv_heads}
    for key, value in sizes.items():
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{key}={value!r} is not allowed; use a positive integer")
    if d_model % num_heads:
        raise ValueError(f"d_model={d_model} is not divisible by num_heads={num_heads}; pick a divisor of d_model")
    if pos == "rope" and (d_model // num_heads) % 2:
        raise ValueError(f"pos='rope' rotates pairs, so d_model/num_heads={d_model // num_heads} must be even; "
                         "change num_heads")
    n_kv_heads = num_heads if n_kv_heads is None else n_kv_heads
    if num_heads % n_kv_heads:
        raise ValueError(f"n_kv_heads={n_kv_heads} does not divide num_heads={num_heads}; use a divisor (1 = MQA)")
    if not math.isfinite(logit_softcap) or logit_softcap < 0:
        raise ValueError(f"logit_softcap={logit_softcap} is not allowed; use 0 (off) or a positive cap such as 30")
    if not math.isfinite(norm_eps) or norm_eps <= 0:
        raise ValueError(f"norm_eps={norm_eps} is not allowed; use a small positive number such as 1e-5")
    if not math.isfinite(rope_theta) or rope_theta <= 0:
        raise ValueError(f"rope_theta={rope_theta} is not allowed; use a positive base such as 10000.0")
    if block == "parallel" and norm == "post":
        raise ValueError("block='parallel' needs norm='pre' or 'none' (x + Attn(N1(x)) + FFN(N2(x))); got norm='post'")
    if d_ff is None:  # SwiGLU's three matrices at 8/3 d_model cost what the ungated FFN's two cost at 4 d_model;
        d_ff = max(64, 64 * math.floor(8 * d_model / 3 / 64 + 0.5)) if ffn == "swiglu" else 4 * d_model  # nearest 64
    resolved = locals()
    return {key: resolved[key] for key in MODEL_KEYS}


# ----------------------------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------------------------

def _at_least_fp32(x: Tensor) -> Tensor:
    """Upcast bf16/fp16 to float32 for precision-sensitive math; float32/float64 pass through."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class Linear(Module):
    """y = x W^T without bias; W (out, in) ~ truncated normal, std sqrt(2 / (in + out)), cut at 3 std."""

    def __init__(self, in_features: int, out_features: int, device=None, dtype=None):
        super().__init__()
        std = math.sqrt(2 / (in_features + out_features))
        self.weight = Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        torch.nn.init.trunc_normal_(self.weight, std=std, a=-3 * std, b=3 * std)

    def forward(self, x: Tensor) -> Tensor:
        return x @ self.weight.T  # (..., in) -> (..., out)


class Embedding(Module):
    """Lookup table: token ids (...) -> rows of `weight` (vocab, d), initialised N(0, 1) cut at 3."""

    def __init__(self, num_embeddings: int, embedding_dim: int, device=None, dtype=None):
        super().__init__()
        self.weight = Parameter(torch.empty(num_embeddings, embedding_dim, device=device, dtype=dtype))
        torch.nn.init.trunc_normal_(self.weight, std=1.0, a=-3.0, b=3.0)

    def forward(self, token_ids: Tensor) -> Tensor:
        return self.weight[token_ids]  # (...) -> (..., d)


class RMSNorm(Module):
    """x / sqrt(mean(x^2) + eps) * gain over the last dim; computed in float32, returned in the input dtype."""

    fast = False  # kernels.rmsnorm instead (TransformerLM.use_kernels sets it)

    def __init__(self, d_model: int, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = Parameter(torch.ones(d_model, device=device, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        if self.fast:
            return kernels.rmsnorm(x, self.weight, self.eps)
        x32 = _at_least_fp32(x)  # squares of bf16 values lose too much precision
        rms = torch.sqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 / rms * self.weight).to(x.dtype)


def silu(x: Tensor) -> Tensor:
    """x * sigmoid(x), a.k.a. swish."""
    return x * torch.sigmoid(x)


def softmax(x: Tensor, dim: int) -> Tensor:
    """exp(x) / sum(exp(x)) along dim; the max is subtracted first so exp never overflows."""
    e = (x - x.detach().amax(dim, keepdim=True)).exp()  # the shift cancels in value and gradient
    return e / e.sum(dim, keepdim=True)


def _nll_and_lse(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Per-position -log p(target) and logsumexp(logits): logits (..., vocab), targets (...) -> two (...) tensors."""
    target_logits = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # before the upcast: saves a float32 copy
    logits = _at_least_fp32(logits)
    m = logits.detach().amax(-1, keepdim=True)  # shift for stability; it cancels in value and gradient
    lse = (logits - m).exp().sum(-1).log() + m.squeeze(-1)
    return lse - target_logits, lse


def cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean of -log softmax(logits)[target] over all leading dims: logits (..., vocab), targets (...) int64."""
    return _nll_and_lse(logits, targets)[0].mean()


class SwiGLU(Module):
    """Gated feed-forward: w2(silu(w1 x) * w3 x), with w1, w3: d_model -> d_ff and w2: d_ff -> d_model."""

    def __init__(self, d_model: int, d_ff: int, device=None, dtype=None):
        super().__init__()
        self.w1 = Linear(d_model, d_ff, device, dtype)
        self.w2 = Linear(d_ff, d_model, device, dtype)
        self.w3 = Linear(d_model, d_ff, device, dtype)

    fast = False  # kernels.swiglu instead (TransformerLM.use_kernels sets it)

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.w1(x), self.w3(x)
        return self.w2(kernels.swiglu(a, b) if self.fast else silu(a) * b)


class SiLUFFN(Module):
    """Ungated feed-forward (ffn='silu'): w2(silu(w1 x))."""

    def __init__(self, d_model: int, d_ff: int, device=None, dtype=None):
        super().__init__()
        self.w1 = Linear(d_model, d_ff, device, dtype)
        self.w2 = Linear(d_ff, d_model, device, dtype)

    fast = False  # kernels.silu instead (TransformerLM.use_kernels sets it)

    def forward(self, x: Tensor) -> Tensor:
        h = self.w1(x)
        return self.w2(kernels.silu(h) if self.fast else silu(h))


class RotaryPositionalEmbedding(Module):
    """RoPE (Su et al. 2021): rotate each pair (x[2k], x[2k+1]) by the angle pos * theta^(-2k/d_k).

    Example: d_k=4, pos=1, theta=10000 turns (x0, x1) by 1 rad and (x2, x3) by 0.01 rad.
    """

    def __init__(self, theta: float, d_k: int, max_seq_len: int, device=None):
        super().__init__()
        inv_freq = theta ** (-torch.arange(0, d_k, 2, device=device, dtype=torch.float64) / d_k)  # (d_k/2,)
        positions = torch.arange(max_seq_len, device=device, dtype=torch.float64)
        angles = positions[:, None] * inv_freq  # (max_seq_len, d_k/2)
        self.register_buffer("cos", angles.cos().float(), persistent=False)  # recomputable, so not in the state dict
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def forward(self, x: Tensor, token_positions: Tensor) -> Tensor:
        """x: (..., seq, d_k), token_positions: (..., seq) -> rotated x, same shape and dtype."""
        cos, sin = self.cos[token_positions], self.sin[token_positions]  # (..., seq, d_k/2)
        x1, x2 = x[..., 0::2], x[..., 1::2]  # the two coordinates of each pair
        rotated = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)  # (..., seq, d_k/2, 2)
        return rotated.flatten(-2).to(x.dtype)  # interleave back: (..., seq, d_k)


def scaled_dot_product_attention(Q: Tensor, K: Tensor, V: Tensor, mask: Tensor | None = None) -> Tensor:
    """softmax(Q K^T / sqrt(d_k)) V, where mask (n, m) is True where a query may attend a key.

    Q (..., n, d_k), K (..., m, d_k), V (..., m, d_v) -> (..., n, d_v); leading dims broadcast (used for GQA).
    """
    scores = Q @ K.transpose(-2, -1) / math.sqrt(Q.shape[-1])  # (..., n, m)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return softmax(_at_least_fp32(scores), -1).to(V.dtype) @ V  # (..., n, d_v)


class KVCache:
    """Keys and values of the positions decoded so far, for every layer of one model.

    k, v: (num_layers, batch, n_kv_heads, max_len, d_head); positions [0, length) are filled.
    Layers call update(); TransformerLM.forward advances `length` once all layers have stored the new positions.
    """

    def __init__(self, num_layers: int, batch_size: int, n_kv_heads: int, max_len: int, d_head: int,
                 device=None, dtype=None):
        self.k = torch.zeros(num_layers, batch_size, n_kv_heads, max_len, d_head, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.length = 0

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store k, v (batch, n_kv_heads, t, d_head) at positions [length, length + t); return all positions so far."""
        end = self.length + k.shape[2]
        assert end <= self.k.shape[3], "KV cache overflow: the model checks positions against context_length"
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]  # (batch, n_kv_heads, end, d_head)

    def reset(self) -> None:
        self.length = 0


class MultiHeadSelfAttention(Module):
    """Causal self-attention with q_proj, k_proj, v_proj, output_proj; optional RoPE, QK-norm and grouped k/v heads.

    With n_kv_heads < num_heads (GQA; 1 = MQA), query heads [g*G, (g+1)*G) share k/v head g, G = num_heads / n_kv_heads
    (Ainslie et al. 2023). qk_norm applies RMSNorm over the head dim to q and k before RoPE (Dehghani et al. 2023).
    """

    fast = False  # kernels.attention without a KV cache or explicit positions (TransformerLM.use_kernels sets it)

    def __init__(self, d_model: int, num_heads: int, n_kv_heads: int | None = None, qk_norm: bool = False,
                 rope: RotaryPositionalEmbedding | None = None, layer_idx: int = 0, device=None, dtype=None):
        super().__init__()
        self.num_heads, self.n_kv_heads = num_heads, n_kv_heads or num_heads
        self.d_head, self.layer_idx = d_model // num_heads, layer_idx
        self.q_proj = Linear(d_model, d_model, device, dtype)
        self.k_proj = Linear(d_model, self.n_kv_heads * self.d_head, device, dtype)
        self.v_proj = Linear(d_model, self.n_kv_heads * self.d_head, device, dtype)
        self.output_proj = Linear(d_model, d_model, device, dtype)
        self.qk_norm = qk_norm
        if qk_norm:
            self.q_norm = RMSNorm(self.d_head, device=device, dtype=dtype)
            self.k_norm = RMSNorm(self.d_head, device=device, dtype=dtype)
        self.rope = rope  # shared by all layers; its buffers are not saved

    def forward(self, x: Tensor, token_positions: Tensor | None = None, kv_cache: KVCache | None = None) -> Tensor:
        """x: (batch, seq, d_model) -> (batch, seq, d_model). With kv_cache, x holds only the positions after it.
        token_positions: (seq,) or (batch, seq), None for 0..seq-1 (the only positions the fused kernel knows)."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.d_head).transpose(1, 2)  # (B, H, T, d_head)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.d_head).transpose(1, 2)  # (B, H_kv, T, d_head)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.d_head).transpose(1, 2)  # (B, H_kv, T, d_head)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.fast and token_positions is None and kv_cache is None:  # the kernel's positions are 0..T-1
            cos, sin = (self.rope.cos, self.rope.sin) if self.rope is not None else (None, None)
            y = kernels.attention(q, k, v, causal=True, rope_cos=cos, rope_sin=sin)  # RoPE fused: (B, H, T, d_head)
            return self.output_proj(y.transpose(1, 2).reshape(B, T, -1))  # a view: y is laid out (B, T, H, d_head)
        if self.rope is not None:
            if token_positions is None:
                token_positions = torch.arange(T, device=x.device)
            if token_positions.dim() > 1:  # (batch, seq) -> (batch, 1, seq): the same rotation for every head
                token_positions = token_positions.unsqueeze(-2)
            q, k = self.rope(q, token_positions), self.rope(k, token_positions)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)  # (B, H_kv, S, d_head), S = cached + T
        S = k.shape[2]
        mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(S - T)  # query i sees keys [0, S - T + i]
        q = q.unflatten(1, (self.n_kv_heads, -1))  # (B, H_kv, G, T, d_head): the G query heads sharing a k/v head
        y = scaled_dot_product_attention(q, k.unsqueeze(2), v.unsqueeze(2), mask)  # k, v broadcast over G
        y = y.flatten(1, 2).transpose(1, 2).reshape(B, T, -1)  # (B, H_kv, G, T, d_head) -> (B, T, H * d_head)
        return self.output_proj(y)


def _identity(x: Tensor) -> Tensor:
    return x


class TransformerBlock(Module):
    """One layer: attention and feed-forward, each in a residual branch.

    norm='pre':  h = x + Attn(ln1(x));  y = h + FFN(ln2(h))       (the standard model)
    norm='post': h = ln1(x + Attn(x));  y = ln2(h + FFN(h))       (original Transformer)
    norm='none': h = x + Attn(x);       y = h + FFN(h)            (no ln1/ln2 parameters)
    block='parallel': y = x + Attn(ln1(x)) + FFN(ln2(x))          (GPT-J / PaLM; norms dropped with norm='none')
    """

    def __init__(self, d_model: int, num_heads: int, d_ff: int, norm: str = "pre", ffn: str = "swiglu",
                 block: str = "serial", qk_norm: bool = False, n_kv_heads: int | None = None,
                 rope: RotaryPositionalEmbedding | None = None, layer_idx: int = 0, device=None, dtype=None):
        super().__init__()
        self.norm, self.block = norm, block
        self.attn = MultiHeadSelfAttention(d_model, num_heads, n_kv_heads, qk_norm, rope, layer_idx, device, dtype)
        self.ffn = (SwiGLU if ffn == "swiglu" else SiLUFFN)(d_model, d_ff, device, dtype)
        if norm != "none":
            self.ln1 = RMSNorm(d_model, device=device, dtype=dtype)
            self.ln2 = RMSNorm(d_model, device=device, dtype=dtype)

    def forward(self, x: Tensor, token_positions: Tensor | None = None, kv_cache: KVCache | None = None) -> Tensor:
        """x: (batch, seq, d_model) -> (batch, seq, d_model)."""
        if self.norm == "post":
            x = self.ln1(x + self.attn(x, token_positions, kv_cache))
            return self.ln2(x + self.ffn(x))
        ln1, ln2 = (self.ln1, self.ln2) if self.norm == "pre" else (_identity, _identity)
        if self.block == "parallel":
            return x + self.attn(ln1(x), token_positions, kv_cache) + self.ffn(ln2(x))
        x = x + self.attn(ln1(x), token_positions, kv_cache)
        return x + self.ffn(ln2(x))


class TransformerLM(Module):
    """Token embeddings -> num_layers TransformerBlocks -> ln_final -> lm_head -> logits.

    norm_eps is every RMSNorm's epsilon. Flags change the modules present: norm='none' has no ln1/ln2/ln_final
    (norm='post' keeps ln_final);
    tie_embeddings=True has no lm_head (the head reads token_embeddings.weight: one Parameter, saved once);
    qk_norm adds attn.q_norm and attn.k_norm.
    """

    fast = False  # kernels.linear_cross_entropy in loss() (use_kernels sets it)

    def __init__(self, vocab_size: int, context_length: int, d_model: int, num_layers: int, num_heads: int,
                 d_ff: int | None = None, rope_theta: float = 10000.0, norm: str = "pre", pos: str = "rope",
                 ffn: str = "swiglu", qk_norm: bool = False, n_kv_heads: int | None = None, logit_softcap: float = 0.0,
                 tie_embeddings: bool = False, block: str = "serial", norm_eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        args = locals()
        self.config = cfg = model_config(**{key: args[key] for key in MODEL_KEYS})
        d_head = d_model // num_heads
        rope = RotaryPositionalEmbedding(rope_theta, d_head, context_length, device) if pos == "rope" else None
        self.token_embeddings = Embedding(vocab_size, d_model, device, dtype)
        self.layers = ModuleList(
            TransformerBlock(d_model, num_heads, cfg["d_ff"], norm, ffn, block, qk_norm, cfg["n_kv_heads"], rope, i,
                             device, dtype) for i in range(num_layers))
        self.ln_final = RMSNorm(d_model, device=device, dtype=dtype) if norm != "none" else None
        self.lm_head = Linear(d_model, vocab_size, device, dtype)
        if tie_embeddings:  # one matrix for both ends, initialised like the head (std 1 would start logits ~sqrt(d))
            self.token_embeddings.weight = self.lm_head.weight
            self.lm_head = None
        for module in self.modules():  # every norm, q_norm and k_norm included (imported models may use 1e-6)
            if isinstance(module, RMSNorm):
                module.eps = norm_eps

    def features(self, idx: Tensor, kv_cache: KVCache | None = None) -> Tensor:
        """Token ids (batch, seq) -> final hidden states (batch, seq, d_model), after ln_final."""
        T, start = idx.shape[1], kv_cache.length if kv_cache is not None else 0
        if start + T > self.config["context_length"]:
            raise ValueError(f"{start} cached + {T} new positions exceed context_length="
                             f"{self.config['context_length']}; crop the input to the last context_length tokens")
        positions = torch.arange(start, start + T, device=idx.device) if kv_cache is not None else None  # None: 0..T-1
        x = self.token_embeddings(idx)  # (batch, seq, d_model)
        for layer in self.layers:
            x = layer(x, positions, kv_cache)
        if kv_cache is not None:
            kv_cache.length += T
        return self.ln_final(x) if self.ln_final is not None else x

    def head(self, x: Tensor) -> Tensor:
        """Hidden states (..., d_model) -> logits (..., vocab), soft-capped into (-C, C) if logit_softcap=C > 0."""
        weight = self.lm_head.weight if self.lm_head is not None else self.token_embeddings.weight  # (vocab, d_model)
        logits = x @ weight.T
        cap = self.config["logit_softcap"]
        return cap * torch.tanh(logits / cap) if cap > 0 else logits  # Gemma 2 (Team et al. 2024)

    def forward(self, idx: Tensor, kv_cache: KVCache | None = None) -> Tensor:
        """idx (batch, seq) int64 -> logits (batch, seq, vocab). With kv_cache, idx holds only the new positions."""
        return self.head(self.features(idx, kv_cache))

    def loss(self, idx: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """(mean cross-entropy, mean logsumexp(logits)^2) in float32; train on ce + z_loss * z (PaLM's z-loss).

        The one place a fused head + loss kernel may replace: it needs features(idx), the head weight
        (lm_head.weight, or token_embeddings.weight when tied), logit_softcap and targets.
        """
        if self.fast:  # chunked head + loss: float32 logits never exist for the whole batch
            weight = self.lm_head.weight if self.lm_head is not None else self.token_embeddings.weight
            return kernels.linear_cross_entropy(self.features(idx), weight, targets, self.config["logit_softcap"])
        nll, lse = _nll_and_lse(self(idx), targets)  # (batch, seq) each
        return nll.mean(), lse.square().mean()

    def use_kernels(self, ops: tuple[str, ...] = KERNEL_OPS) -> "TransformerLM":
        """Route the named ops through kernels.py's fused versions (Triton kernels on CUDA, their torch references
        where Triton cannot run); () switches all back. Decoding with a KV cache keeps the reference attention."""
        if set(ops) - set(KERNEL_OPS):
            raise ValueError(f"use_kernels: unknown ops {sorted(set(ops) - set(KERNEL_OPS))}; choose from {KERNEL_OPS}")
        owners = {"rmsnorm": RMSNorm, "swiglu": (SwiGLU, SiLUFFN), "attention": MultiHeadSelfAttention,
                  "cross_entropy": TransformerLM}
        for op, module_types in owners.items():
            for module in self.modules():
                if isinstance(module, module_types):
                    module.fast = op in ops
        return self

    def kernel_preflight(self, batch_size: int = 2, dtype: torch.dtype = torch.float32) -> dict[str, str | None]:
        """Try each op of KERNEL_OPS fused alone, on a copy of this model at its context length: loss forward and
        backward on a random batch (autocast in dtype unless float32) against the reference ops. Returns {op: None}
        where loss and every gradient agree, else {op: one-line reason}; the model itself is left untouched."""
        tokens = torch.randint(0, self.config["vocab_size"], (batch_size, self.config["context_length"] + 1),
                               generator=torch.Generator().manual_seed(0)).to(self.token_embeddings.weight.device)
        reference = _preflight_run(self, (), tokens, dtype)  # an error here is the model's, not a kernel's: raised
        result = {}
        for op in KERNEL_OPS:
            try:
                result[op] = _preflight_mismatch(_preflight_run(self, (op,), tokens, dtype), reference, dtype)
            except Exception as e:  # Triton compile errors, no C compiler, out of shared memory, ...
                result[op] = f"{type(e).__name__}: {(str(e).strip() or '-').splitlines()[0]}"[:150]
        return result

    def new_kv_cache(self, batch_size: int) -> KVCache:
        """An empty KV cache holding context_length positions, on the model's device and dtype."""
        c, weight = self.config, self.token_embeddings.weight
        d_head = c["d_model"] // c["num_heads"]
        return KVCache(c["num_layers"], batch_size, c["n_kv_heads"], c["context_length"], d_head, weight.device,
                       weight.dtype)

    def num_params(self) -> int:
        """Number of distinct parameters (a tied matrix counts once)."""
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self) -> int:
        """Forward FLOPs per token at full context (see accounting); training costs 3x."""
        return accounting(self.config)["flops"]["total"]

    def memory_estimate(self, batch_size: int, autocast_bf16: bool) -> dict:
        """Bytes for AdamW training at this batch: params, grads, adam, activations, total (see accounting)."""
        return accounting(self.config, batch_size)["memory"]["bf16" if autocast_bf16 else "fp32"]


_PREFLIGHT_TOL = {torch.float32: (1e-3, 1e-2), torch.float16: (1e-2, 5e-2), torch.bfloat16: (2e-2, 5e-2)}  # loss, grad


def _preflight_run(model: TransformerLM, ops: tuple[str, ...], tokens: Tensor, dtype: torch.dtype) -> dict:
    """ce, z and every parameter's gradient of ce + 0.01 z, from a deep copy of model with only `ops` fused."""
    twin = copy.deepcopy(model).use_kernels(ops)
    twin.zero_grad(set_to_none=True)
    with torch.autocast(tokens.device.type, dtype=dtype, enabled=dtype != torch.float32):
        ce, z = twin.loss(tokens[:, :-1], tokens[:, 1:])
    (ce + 0.01 * z).backward()
    return {"loss ce": ce.detach(), "loss z": z.detach(), **{f"grad {n}": p.grad for n, p in twin.named_parameters()}}


def _preflight_mismatch(got: dict, want: dict, dtype: torch.dtype) -> str | None:
    """The first tensor whose max |got - want| exceeds its tolerance relative to max |want|, as one line; else None."""
    for name, ref in want.items():
        tol = _PREFLIGHT_TOL[dtype][0 if name.startswith("loss") else 1] * max(ref.abs().max().item(), 1e-6)
        diff = (got[name].float() - ref.float()).abs().max().item() if got[name] is not None else math.inf
        if not diff <= tol:  # NaN fails too
            return f"{name} differs from the reference ops by {diff:.2e} (tolerance {tol:.2e})"
    return None


def format_preflight(result: dict[str, str | None]) -> str:
    """One line from kernel_preflight's result: 'kernels: on rmsnorm, swiglu | off: attention (RuntimeError: ...)'."""
    on = [op for op, why in result.items() if why is None]
    off = [f"{op} ({why})" for op, why in result.items() if why is not None]
    return f"kernels: on {', '.join(on) or '-'} | off: {', '.join(off) or '-'}"


# ----------------------------------------------------------------------------------------------------------------
# Resource accounting: parameters, FLOPs and training memory from the config alone
# ----------------------------------------------------------------------------------------------------------------

def accounting(cfg: dict, batch_size: int = 1) -> dict:
    """Parameters by component, forward FLOPs per token by component, and AdamW training memory, without a model.

    cfg: any dict holding the model keys (a train config works). FLOPs: 2 per multiply-add, every matmul, at
    T = context_length, with attention scores QK^T and the weighted sum AV over the full T x T square (the usual
    CS336 / Kaplan et al. count; causal masking could skip half). Elementwise ops (norms, softmax, RoPE) are not
    counted. Activation memory is an estimate (what autograd keeps, see below); train.py prints the measured peak.
    Example: the TinyStories model (V=10000, T=256, d=512, 4 layers, d_ff=1344) has 22,696,448 parameters and
    37,240,832 forward FLOPs per token.
    """
    if batch_size < 1:  # negative activation memory otherwise
        raise ValueError(f"batch_size={batch_size} is not allowed; use a positive integer")
    c = model_config(**{key: cfg[key] for key in MODEL_KEYS if key in cfg})
    V, T, d, L, H, f = (c[k] for k in ("vocab_size", "context_length", "d_model", "num_layers", "num_heads", "d_ff"))
    d_head = d // H
    kv = c["n_kv_heads"] * d_head  # width of the k and v projections
    n_ffn = 3 if c["ffn"] == "swiglu" else 2  # weight matrices in the FFN
    norms = c["norm"] != "none"
    params = {"embeddings": V * d,
              "attention": L * (2 * d * d + 2 * d * kv),  # q, output (d x d) and k, v (d x kv)
              "ffn": L * n_ffn * d * f,
              "norms": norms * (2 * L + 1) * d + c["qk_norm"] * 2 * L * d_head,
              "head": 0 if c["tie_embeddings"] else V * d}
    params["total"] = sum(params.values())
    flops = {"attention_proj": 2 * params["attention"],
             "attention_scores": 2 * L * T * d,  # each query: T keys x d_head per head, all heads
             "attention_values": 2 * L * T * d,  # each query: T values x d_head per head
             "ffn": 2 * params["ffn"],
             "head": 2 * d * V}  # the embedding lookup costs no FLOPs
    flops["total"] = sum(flops.values())
    # Activations: the elements per token autograd keeps for backward (checked with saved-tensor hooks). `full` stay
    # float32 under bf16 autocast: each RMSNorm's input and normalised input, softmax exponentials, the loss's
    # exponentials. `low` take 2 bytes under autocast: the inputs of q/k/v, output_proj and the FFN, the q, k, v
    # operands of attention (k, v broadcast to every head), probabilities, FFN hidden activations, logits.
    qk, cap = c["qk_norm"], c["logit_softcap"] > 0
    full = norms * (2 * L + 1) * 2 * d + L * (qk * 2 * (d + kv) + H * T) + V
    low = L * (3 * d + 3 * d + H * T + (5 if n_ffn == 3 else 3) * f) + d + V * (1 + cap)
    tokens, P = batch_size * T, params["total"]
    bf16_weights = 2 * (params["attention"] + params["ffn"] + V * d)  # autocast's weight copies, kept for backward
    memory = {}
    for name, low_bytes, extra in (("fp32", 4, 0), ("bf16", 2, bf16_weights)):  # params, grads, AdamW stay float32
        m = {"params": 4 * P, "grads": 4 * P, "adam": 8 * P,
             "activations": tokens * (low_bytes * low + 4 * full) + extra}
        memory[name] = {**m, "total": sum(m.values())}
    return {"config": c, "batch_size": batch_size, "params": params, "flops": flops, "memory": memory}


def format_accounting(acc: dict) -> str:
    """The accounting dict as three small tables (parameters, FLOPs per token, training memory)."""
    p, f, mem, c = acc["params"], acc["flops"], acc["memory"], acc["config"]
    shape = ", ".join(f"{k}={v}" for k, v in c.items())
    lines = [f"model: {shape}", "", f"{'parameters':<22}{'count':>16}{'share':>8}"]
    lines += [f"  {k:<20}{v:>16,}{v / p['total']:>8.1%}" for k, v in p.items()]
    lines += ["", f"{'forward FLOPs/token':<22}{'FLOPs':>16}{'share':>8}"
                  f"   (T={c['context_length']}, attention over the full T x T)"]
    lines += [f"  {k:<20}{v:>16,}{v / f['total']:>8.1%}" for k, v in f.items()]
    lines += [f"  {'train (3x forward)':<20}{3 * f['total']:>16,}",
              f"  {'forward / sequence':<20}{f['total'] * c['context_length']:>16.4g}",
              "", f"{'training memory, GiB':<22}{'float32':>12}{'bf16 autocast':>16}"
                  f"   (AdamW, batch {acc['batch_size']})"]
    lines += [f"  {k:<20}{mem['fp32'][k] / 2**30:>12.3f}{mem['bf16'][k] / 2**30:>16.3f}" for k in mem["fp32"]]
    return "\n".join(lines)


if __name__ == "__main__":
    from configurator import run_cli

    def main(argv: list[str]) -> None:
        """python model.py [config/FILE.py ...] [--key=value ...]: the accounting of a train.py configuration."""
        import train  # train.py imports this module: import it only when run as a script

        run_config = train.configure(train.DEFAULTS, argv)
        print(format_accounting(accounting(run_config, run_config["batch_size"])))

    run_cli(main)
