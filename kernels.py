"""The fast GPU path: Triton kernels written here, each beside the plain-torch reference it must match.

On a GPU, everything except the big matmuls is bound by memory traffic, so each kernel exists to read and
write every tensor once per direction:
- rmsnorm: mean of squares, rsqrt, scale and gain in one pass over each row (fp32 math, input dtype out); the
  backward rebuilds x_hat from the saved 1/rms and reduces the gain's gradient per program.
- swiglu / silu: silu(a) * b in one pass; the backward recomputes sigmoid(a) instead of storing it.
- attention: FlashAttention-2 (Dao, 2023): softmax(q k^T / sqrt(d)) v one query tile at a time, with an online
  softmax over key tiles, so the (seq, seq) scores never reach memory; the backward recomputes P from the saved
  log-sum-exp. RoPE is applied to q and k as tiles are loaded (its inverse to dq and dk before they are
  stored), so rotated copies never exist (in bf16/fp16; float32 is rotated in torch first, see `attention`);
  grouped-query attention reads kv head h // (heads / kv_heads). Grid axis 0 is batch * heads (can be large).
- linear_cross_entropy: output projection + cross-entropy over chunks of rows, so float32 logits exist for one
  chunk at a time; the forward leaves the logit gradient in the matmul dtype and the backward is two matmuls
  (the idea of Liger-Kernel's fused linear cross-entropy). Plain torch: cuBLAS does the heavy lifting.

Each public function runs its Triton kernel on CUDA tensors, or on CPU tensors when TRITON_INTERPRET=1 was set
before this module was imported (Triton's interpreter: slow, for tests); otherwise it runs the reference.
"""
import math
import os
import types

import torch

try:
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:  # CPU builds of torch ship without Triton: the kernels are defined but never launched
    triton = tl = types.SimpleNamespace(jit=lambda fn: fn, constexpr=None)
    HAS_TRITON = False

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def available() -> bool:
    """True when the Triton kernels can run here: Triton importable and CUDA present, or the interpreter on."""
    return HAS_TRITON and (INTERPRET or torch.cuda.is_available())


def _use_triton(x: torch.Tensor) -> bool:
    return HAS_TRITON and (x.is_cuda or (INTERPRET and x.device.type == "cpu"))


def _num_warps(block: int) -> int:
    """Warps for a row-wise kernel over `block` columns (Liger-Kernel's rule of thumb, with 8 warps from 1,024 rather
    than 2,048: at 4 warps the bf16 rmsnorm backward spills at d=768 on sm_80)."""
    return 16 if block >= 8192 else 8 if block >= 1024 else 4


def _num_programs(n_rows: int, device: torch.device) -> int:
    """Persistent programs for a row loop: about four per SM of an H100 (132 SMs), a handful in the interpreter.
    A constant rather than a device query keeps torch.compile's trace free of driver calls."""
    return min(n_rows, 512 if device.type == "cuda" else 4)


# ----------------------------------------------------------------------------------------------------------------
# RMSNorm: y = x / sqrt(mean(x^2) + eps) * weight
# ----------------------------------------------------------------------------------------------------------------

def rmsnorm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """RMSNorm over the last dim in float32, returned in x's dtype (model.RMSNorm's math)."""
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)


@triton.jit
def _rmsnorm_fwd_kernel(X, W, Y, RSTD, stride_x, stride_y, n_cols, eps, BLOCK: tl.constexpr):
    """One program per row: y = x * rstd * w, rstd = 1 / sqrt(mean(x^2) + eps) saved for the backward."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    tl.store(RSTD + row, rstd)
    tl.store(Y + row * stride_y + cols, (x * rstd * w).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rmsnorm_bwd_kernel(X, W, DY, RSTD, DX, DW_PARTIAL, stride_x, stride_dy, stride_dx, n_rows, n_cols,
                        BLOCK: tl.constexpr):
    """Each program walks rows pid, pid + programs, ...: dx = rstd * (g - x_hat * mean(g * x_hat)) with g = dy * w,
    and sums dy * x_hat over its rows into its own row of DW_PARTIAL (the host adds the partials)."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK,), dtype=tl.float32)
    for row in range(pid, n_rows, tl.num_programs(0)):
        r = tl.cast(row, tl.int64)
        x = tl.load(X + r * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + r * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + r)
        x_hat = x * rstd
        g = dy * w
        dx = (g - x_hat * (tl.sum(g * x_hat, axis=0) / n_cols)) * rstd
        tl.store(DX + r * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
        dw += dy * x_hat
    tl.store(DW_PARTIAL + pid * n_cols + cols, dw, mask=mask)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        x2 = x.reshape(-1, x.shape[-1]).contiguous()  # (rows, d)
        n_rows, d = x2.shape
        y = torch.empty_like(x2)
        rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
        block = triton.next_power_of_2(d)
        _rmsnorm_fwd_kernel[(n_rows,)](x2, weight, y, rstd, x2.stride(0), y.stride(0), d, eps,
                                       BLOCK=block, num_warps=_num_warps(block))
        ctx.save_for_backward(x2, weight, rstd)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        n_rows, d = x2.shape
        dy2 = dy.reshape(-1, d).contiguous()
        dx = torch.empty_like(x2)
        programs = _num_programs(n_rows, x2.device)
        dw_partial = torch.empty(programs, d, dtype=torch.float32, device=x2.device)
        block = triton.next_power_of_2(d)
        _rmsnorm_bwd_kernel[(programs,)](x2, weight, dy2, rstd, dx, dw_partial, x2.stride(0), dy2.stride(0),
                                         dx.stride(0), n_rows, d, BLOCK=block, num_warps=_num_warps(block))
        return dx.view(dy.shape), dw_partial.sum(0).to(weight.dtype), None


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """RMSNorm over the last dim of x: (..., d) with gain weight: (d,); fp32 math, x's dtype out."""
    if not _use_triton(x):
        return rmsnorm_reference(x, weight, eps)
    return _RMSNorm.apply(x, weight.contiguous(), eps)


# ----------------------------------------------------------------------------------------------------------------
# SwiGLU gate: silu(a) * b, and the ungated silu(a)
# ----------------------------------------------------------------------------------------------------------------

def swiglu_reference(a: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """silu(a) * b (or silu(a) when b is None), silu(a) = a * sigmoid(a)."""
    out = a * torch.sigmoid(a)
    return out if b is None else out * b


_ELEMENTWISE_BLOCK = 1024


@triton.jit
def _swiglu_fwd_kernel(A, B, OUT, n, GATED: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    a = tl.load(A + offs, mask=mask, other=0.0).to(tl.float32)
    out = a * tl.sigmoid(a)
    if GATED:
        out = out * tl.load(B + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + offs, out.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(A, B, DOUT, DA, DB, n, GATED: tl.constexpr, BLOCK: tl.constexpr):
    """d silu(a)/da = sig * (1 + a * (1 - sig)); with a gate b: da = dout * b * silu'(a), db = dout * silu(a)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    a = tl.load(A + offs, mask=mask, other=0.0).to(tl.float32)
    dout = tl.load(DOUT + offs, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(a)
    if GATED:
        tl.store(DB + offs, (dout * a * sig).to(DB.dtype.element_ty), mask=mask)
        dout = dout * tl.load(B + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(DA + offs, (dout * sig * (1.0 + a * (1.0 - sig))).to(DA.dtype.element_ty), mask=mask)


class _SwiGLU(torch.autograd.Function):
    """b=None gives the ungated silu(a); the kernels then never touch B (a stands in for it)."""

    @staticmethod
    def forward(ctx, a, b):
        a = a.contiguous()
        gated = b is not None
        b = b.contiguous() if gated else a
        out = torch.empty_like(a)
        grid = (triton.cdiv(a.numel(), _ELEMENTWISE_BLOCK),)
        _swiglu_fwd_kernel[grid](a, b, out, a.numel(), GATED=gated, BLOCK=_ELEMENTWISE_BLOCK, num_warps=4)
        ctx.save_for_backward(a, b)
        ctx.gated = gated
        return out

    @staticmethod
    def backward(ctx, dout):
        a, b = ctx.saved_tensors
        dout = dout.contiguous()
        da = torch.empty_like(a)
        db = torch.empty_like(b) if ctx.gated else da
        grid = (triton.cdiv(a.numel(), _ELEMENTWISE_BLOCK),)
        _swiglu_bwd_kernel[grid](a, b, dout, da, db, a.numel(), GATED=ctx.gated, BLOCK=_ELEMENTWISE_BLOCK,
                                 num_warps=4)
        return da, (db if ctx.gated else None)


def swiglu(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """silu(a) * b elementwise for a, b of one shape and dtype (the SwiGLU gate: a = w1 x, b = w3 x)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        raise ValueError(f"swiglu needs a and b of one shape and dtype, got {tuple(a.shape)} {a.dtype} "
                         f"and {tuple(b.shape)} {b.dtype}")
    if not _use_triton(a):
        return swiglu_reference(a, b)
    return _SwiGLU.apply(a, b)


def silu(a: torch.Tensor) -> torch.Tensor:
    """silu(a) = a * sigmoid(a) elementwise (the ungated FFN)."""
    if not _use_triton(a):
        return swiglu_reference(a)
    return _SwiGLU.apply(a, None)


# ----------------------------------------------------------------------------------------------------------------
# Attention: causal softmax(q k^T / sqrt(d)) v with RoPE on q, k and grouped-query heads
# ----------------------------------------------------------------------------------------------------------------

def rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the interleaved pairs (x[2k], x[2k+1]) of x: (..., seq, d) by cos, sin: (seq, d/2) (the model's RoPE)."""
    x_even, x_odd = x[..., 0::2], x[..., 1::2]
    return torch.stack((x_even * cos - x_odd * sin, x_even * sin + x_odd * cos), dim=-1).flatten(-2)


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                        rope_cos: torch.Tensor | None = None, rope_sin: torch.Tensor | None = None) -> torch.Tensor:
    """The same attention in plain torch, materialising the (seq, seq) scores; shapes as in `attention`."""
    seq, d = q.shape[-2], q.shape[-1]
    if rope_cos is not None:
        q = rope_reference(q, rope_cos[:seq], rope_sin[:seq])
        k = rope_reference(k, rope_cos[:seq], rope_sin[:seq])
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # (batch, heads, seq, d)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(d)  # (batch, heads, seq, seq)
    if causal:
        allowed = torch.ones(seq, seq, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores.float(), dim=-1).to(v.dtype) @ v


@triton.jit
def _rotate(x, cos, sin, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rotate each pair (x[:, 2k], x[:, 2k+1]) of x: (ROWS, BLOCK_D) by the angle with cos, sin: (ROWS, BLOCK_D/2)."""
    x_even, x_odd = tl.split(tl.reshape(x, (ROWS, BLOCK_D // 2, 2)))
    rotated = tl.join(x_even * cos - x_odd * sin, x_even * sin + x_odd * cos)  # (ROWS, BLOCK_D/2, 2)
    return tl.reshape(rotated, (ROWS, BLOCK_D))


@triton.jit
def _load_rope(COS, SIN, rows, seq, d, stride_rope, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """cos and sin for positions `rows`: (ROWS, BLOCK_D/2) each, zero past seq or d/2."""
    half = tl.arange(0, BLOCK_D // 2)
    offs = rows[:, None] * stride_rope + half[None, :]
    mask = (rows[:, None] < seq) & (half[None, :] < d // 2)
    return tl.load(COS + offs, mask=mask, other=0.0), tl.load(SIN + offs, mask=mask, other=0.0)


@triton.jit
def _load_tile(PTR, rows, stride_row, seq, d, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows `rows` of a (seq, d) matrix with unit column stride: (ROWS, BLOCK_D), zero past seq or d."""
    cols = tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < seq) & (cols[None, :] < d)
    return tl.load(PTR + rows[:, None] * stride_row + cols[None, :], mask=mask, other=0.0)


@triton.jit
def _store_tile(PTR, x, rows, stride_row, seq, d, BLOCK_D: tl.constexpr):
    cols = tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < seq) & (cols[None, :] < d)
    tl.store(PTR + rows[:, None] * stride_row + cols[None, :], x.to(PTR.dtype.element_ty), mask=mask)


@triton.jit
def _load_rotated(PTR, COS, SIN, rows, stride_row, seq, d, stride_rope, ROPE: tl.constexpr, ROWS: tl.constexpr,
                  BLOCK_D: tl.constexpr):
    """A q or k tile, RoPE-rotated (in fp32, then back to the input dtype for tl.dot) when ROPE."""
    x = _load_tile(PTR, rows, stride_row, seq, d, ROWS, BLOCK_D)
    if ROPE:
        cos, sin = _load_rope(COS, SIN, rows, seq, d, stride_rope, ROWS, BLOCK_D)
        x = _rotate(x.to(tl.float32), cos, sin, ROWS, BLOCK_D).to(PTR.dtype.element_ty)
    return x


@triton.jit
def _store_unrotated(PTR, COS, SIN, grad, rows, stride_row, seq, d, stride_rope, ROPE: tl.constexpr,
                     ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """Store the gradient w.r.t. a rotated tile as the gradient w.r.t. the unrotated input: R^T grad, the
    rotation by the opposite angle."""
    if ROPE:
        cos, sin = _load_rope(COS, SIN, rows, seq, d, stride_rope, ROWS, BLOCK_D)
        grad = _rotate(grad, cos, -sin, ROWS, BLOCK_D)
    _store_tile(PTR, grad, rows, stride_row, seq, d, BLOCK_D)


@triton.jit
def _attn_fwd_kernel(Q, K, V, O, LSE, COS, SIN,
                     sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot, stride_rope,
                     n_heads, group, seq, d, qk_scale,
                     CAUSAL: tl.constexpr, ROPE: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (batch * head, query tile): o = softmax(q k^T * scale) v by an online softmax over key tiles.
    Scores are kept in base 2 (qk_scale = scale * log2(e)) so exp2 can be used; LSE saves m + log2(l)."""
    start_m = tl.program_id(1) * BLOCK_M
    bh = tl.program_id(0)
    b, h = (bh // n_heads).to(tl.int64), bh % n_heads
    kv_h = h // group
    q_ptr, o_ptr = Q + b * sqb + h * sqh, O + b * sob + h * soh
    k_ptr, v_ptr = K + b * skb + kv_h * skh, V + b * svb + kv_h * svh
    offs_m = start_m + tl.arange(0, BLOCK_M)
    q = _load_rotated(q_ptr, COS, SIN, offs_m, sqt, seq, d, stride_rope, ROPE, BLOCK_M, BLOCK_D)  # (M, D)

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)  # running row max of the scores
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)  # running sum of exp2(score - m_i)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)  # running sum of exp2(score - m_i) * v
    hi = seq
    if CAUSAL:  # key tiles right of the diagonal are entirely masked: skip them
        hi = tl.minimum(start_m + BLOCK_M, seq)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_rotated(k_ptr, COS, SIN, offs_n, skt, seq, d, stride_rope, ROPE, BLOCK_N, BLOCK_D)  # (N, D)
        v = _load_tile(v_ptr, offs_n, svt, seq, d, BLOCK_N, BLOCK_D)  # (N, D)
        s = tl.dot(q, tl.trans(k)) * qk_scale  # (M, N)
        keep = offs_n[None, :] < seq
        if CAUSAL:
            keep = keep & (offs_m[:, None] >= offs_n[None, :])
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: key 0 is in the first tile and visible to all
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)  # rescales what was summed under the old max
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    _store_tile(o_ptr, acc / l_i[:, None], offs_m, sot, seq, d, BLOCK_D)
    tl.store(LSE + bh.to(tl.int64) * seq + offs_m, m_i + tl.log2(l_i), mask=offs_m < seq)


@triton.jit
def _attn_bwd_delta_kernel(O, DO, DELTA, sob, soh, sot, sdob, sdoh, sdot, n_heads, seq, d,
                           BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """delta_i = sum_d dO_id * O_id = sum_j P_ij dP_ij: the row term of the softmax backward."""
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    bh = tl.program_id(0)
    b, h = (bh // n_heads).to(tl.int64), bh % n_heads
    o = _load_tile(O + b * sob + h * soh, offs_m, sot, seq, d, BLOCK_M, BLOCK_D).to(tl.float32)
    do = _load_tile(DO + b * sdob + h * sdoh, offs_m, sdot, seq, d, BLOCK_M, BLOCK_D).to(tl.float32)
    tl.store(DELTA + bh.to(tl.int64) * seq + offs_m, tl.sum(o * do, axis=1), mask=offs_m < seq)


@triton.jit
def _attn_bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, COS, SIN,
                          sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sdob, sdoh, sdot,
                          sdkb, sdkh, sdkt, sdvb, sdvh, sdvt, stride_rope,
                          n_heads, group, seq, d, qk_scale, sm_scale,
                          CAUSAL: tl.constexpr, ROPE: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (batch * kv head, key tile): dv = sum P^T dO and dk = scale * sum dS^T q over every query tile
    of every query head sharing this kv head, with P recomputed from the LSE and dS = P * (dP - delta)."""
    start_n = tl.program_id(1) * BLOCK_N
    bkv = tl.program_id(0)
    n_kv_heads = n_heads // group
    b, kv_h = (bkv // n_kv_heads).to(tl.int64), bkv % n_kv_heads
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k = _load_rotated(K + b * skb + kv_h * skh, COS, SIN, offs_n, skt, seq, d, stride_rope, ROPE, BLOCK_N, BLOCK_D)
    v = _load_tile(V + b * svb + kv_h * svh, offs_n, svt, seq, d, BLOCK_N, BLOCK_D)
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    lo = 0
    if CAUSAL:  # query tiles wholly above the diagonal cannot see these keys
        lo = (start_n // BLOCK_M) * BLOCK_M
    for h in range(kv_h * group, (kv_h + 1) * group):
        q_ptr, do_ptr = Q + b * sqb + h * sqh, DO + b * sdob + h * sdoh
        row_ptr = (b * n_heads + h) * seq  # LSE and DELTA: (batch * heads, seq)
        for start_m in range(lo, seq, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            q = _load_rotated(q_ptr, COS, SIN, offs_m, sqt, seq, d, stride_rope, ROPE, BLOCK_M, BLOCK_D)
            do = _load_tile(do_ptr, offs_m, sdot, seq, d, BLOCK_M, BLOCK_D)
            lse = tl.load(LSE + row_ptr + offs_m, mask=offs_m < seq, other=0.0)
            delta = tl.load(DELTA + row_ptr + offs_m, mask=offs_m < seq, other=0.0)
            p_t = tl.exp2(tl.dot(k, tl.trans(q)) * qk_scale - lse[None, :])  # (N, M) = P^T
            keep = offs_m[None, :] < seq
            if CAUSAL:
                keep = keep & (offs_m[None, :] >= offs_n[:, None])
            p_t = tl.where(keep, p_t, 0.0)
            dv += tl.dot(p_t.to(do.dtype), do)
            dp_t = tl.dot(v, tl.trans(do))  # (N, M) = dP^T
            dk += tl.dot((p_t * (dp_t - delta[None, :])).to(q.dtype), q)
    _store_unrotated(DK + b * sdkb + kv_h * sdkh, COS, SIN, dk * sm_scale, offs_n, sdkt, seq, d, stride_rope, ROPE,
                     BLOCK_N, BLOCK_D)
    _store_tile(DV + b * sdvb + kv_h * sdvh, dv, offs_n, sdvt, seq, d, BLOCK_D)


@triton.jit
def _attn_bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, COS, SIN,
                        sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sdob, sdoh, sdot, sdqb, sdqh, sdqt, stride_rope,
                        n_heads, group, seq, d, qk_scale, sm_scale,
                        CAUSAL: tl.constexpr, ROPE: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (batch * head, query tile): dq = scale * sum dS k over the visible key tiles."""
    start_m = tl.program_id(1) * BLOCK_M
    bh = tl.program_id(0)
    b, h = (bh // n_heads).to(tl.int64), bh % n_heads
    kv_h = h // group
    k_ptr, v_ptr = K + b * skb + kv_h * skh, V + b * svb + kv_h * svh
    offs_m = start_m + tl.arange(0, BLOCK_M)
    q = _load_rotated(Q + b * sqb + h * sqh, COS, SIN, offs_m, sqt, seq, d, stride_rope, ROPE, BLOCK_M, BLOCK_D)
    do = _load_tile(DO + b * sdob + h * sdoh, offs_m, sdot, seq, d, BLOCK_M, BLOCK_D)
    lse = tl.load(LSE + bh.to(tl.int64) * seq + offs_m, mask=offs_m < seq, other=0.0)
    delta = tl.load(DELTA + bh.to(tl.int64) * seq + offs_m, mask=offs_m < seq, other=0.0)
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    hi = seq
    if CAUSAL:
        hi = tl.minimum(start_m + BLOCK_M, seq)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_rotated(k_ptr, COS, SIN, offs_n, skt, seq, d, stride_rope, ROPE, BLOCK_N, BLOCK_D)
        v = _load_tile(v_ptr, offs_n, svt, seq, d, BLOCK_N, BLOCK_D)
        p = tl.exp2(tl.dot(q, tl.trans(k)) * qk_scale - lse[:, None])  # (M, N)
        keep = offs_n[None, :] < seq
        if CAUSAL:
            keep = keep & (offs_m[:, None] >= offs_n[None, :])
        p = tl.where(keep, p, 0.0)
        dp = tl.dot(do, tl.trans(v))  # (M, N)
        dq += tl.dot((p * (dp - delta[:, None])).to(k.dtype), k)
    _store_unrotated(DQ + b * sdqb + h * sdqh, COS, SIN, dq * sm_scale, offs_m, sdqt, seq, d, stride_rope, ROPE,
                     BLOCK_M, BLOCK_D)


def _attn_blocks(block_d: int, dtype: torch.dtype) -> dict:
    """Tile sizes, (query rows, key rows) per kernel, warps and pipeline stages. GPU values start from the Triton
    fused-attention tutorial, checked with ptxas for sm_80 and sm_90 (test_kernels_compile_ahead_of_time_sm80_sm90):
    with 8 warps no kernel spills (4 warps spill in the dk/dv kernel); d_head > 64 takes smaller tiles, and in
    float32 two stages, since three need 181,248 B of shared memory on sm_80 (limit 166,912). The interpreter
    gets small unequal tiles so tiny test shapes still span several."""
    if INTERPRET:
        return dict(fwd=(32, 16), dkdv=(16, 32), dq=(32, 16), warps=1, stages=1)
    if block_d <= 64:
        return dict(fwd=(128, 64), dkdv=(16, 128), dq=(128, 32), warps=8, stages=3)
    if dtype == torch.float32:
        return dict(fwd=(64, 64), dkdv=(32, 32), dq=(64, 32), warps=8, stages=2)
    return dict(fwd=(64, 64), dkdv=(32, 64), dq=(64, 32), warps=8, stages=3)


def _attn_grid(rows: int, seq: int, block: int) -> tuple[int, int]:
    """Launch grid (batch * heads, tiles): the large dimension on axis 0, which takes up to 2^31 - 1 programs;
    axis 1 stops at 65,535, which batch * heads can pass (4,096 sequences of 16 heads) but tiles of seq cannot."""
    return rows, triton.cdiv(seq, block)


def _strides(x: torch.Tensor) -> tuple:
    """(batch, head, seq) strides of a (batch, heads, seq, d) tensor with unit stride along d."""
    return x.stride(0), x.stride(1), x.stride(2)


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, rope_cos, rope_sin):
        batch, n_heads, seq, d = q.shape
        group = n_heads // k.shape[1]
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        rope = rope_cos is not None
        cos, sin = (rope_cos.float().contiguous(), rope_sin.float().contiguous()) if rope else (q, q)
        o = torch.empty(batch, seq, n_heads, d, dtype=q.dtype, device=q.device).transpose(1, 2)  # (B, H, T, d)
        lse = torch.empty(batch * n_heads, seq, dtype=torch.float32, device=q.device)
        block_d = max(16, triton.next_power_of_2(d))
        cfg = _attn_blocks(block_d, q.dtype)
        block_m, block_n = cfg["fwd"]
        scale = 1.0 / math.sqrt(d)
        _attn_fwd_kernel[_attn_grid(batch * n_heads, seq, block_m)](
            q, k, v, o, lse, cos, sin, *_strides(q), *_strides(k), *_strides(v), *_strides(o), cos.stride(0),
            n_heads, group, seq, d, scale * math.log2(math.e), CAUSAL=causal, ROPE=rope,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=cfg["warps"], num_stages=cfg["stages"])
        ctx.save_for_backward(q, k, v, o, lse, cos, sin)
        ctx.causal, ctx.rope = causal, rope
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, cos, sin = ctx.saved_tensors
        batch, n_heads, seq, d = q.shape
        group = n_heads // k.shape[1]
        do = do if do.stride(-1) == 1 else do.contiguous()
        block_d = max(16, triton.next_power_of_2(d))
        cfg = _attn_blocks(block_d, q.dtype)
        scale = 1.0 / math.sqrt(d)
        common = dict(CAUSAL=ctx.causal, ROPE=ctx.rope, BLOCK_D=block_d, num_warps=cfg["warps"],
                      num_stages=cfg["stages"])
        delta = torch.empty_like(lse)
        _attn_bwd_delta_kernel[_attn_grid(batch * n_heads, seq, 64)](
            o, do, delta, *_strides(o), *_strides(do), n_heads, seq, d, BLOCK_M=64, BLOCK_D=block_d)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        block_m, block_n = cfg["dkdv"]
        _attn_bwd_dkdv_kernel[_attn_grid(batch * k.shape[1], seq, block_n)](
            q, k, v, do, lse, delta, dk, dv, cos, sin, *_strides(q), *_strides(k), *_strides(v), *_strides(do),
            *_strides(dk), *_strides(dv), cos.stride(0), n_heads, group, seq, d, scale * math.log2(math.e), scale,
            BLOCK_M=block_m, BLOCK_N=block_n, **common)
        block_m, block_n = cfg["dq"]
        _attn_bwd_dq_kernel[_attn_grid(batch * n_heads, seq, block_m)](
            q, k, v, do, lse, delta, dq, cos, sin, *_strides(q), *_strides(k), *_strides(v), *_strides(do),
            *_strides(dq), cos.stride(0), n_heads, group, seq, d, scale * math.log2(math.e), scale,
            BLOCK_M=block_m, BLOCK_N=block_n, **common)
        return dq, dk, dv, None, None, None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
              rope_cos: torch.Tensor | None = None, rope_sin: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(rope(q) rope(k)^T / sqrt(d)) v, causal by default, at positions 0..seq-1.

    q: (batch, heads, seq, d); k, v: (batch, kv_heads, seq, d) with heads % kv_heads == 0 (query head h reads kv
    head h // (heads / kv_heads)); rope_cos, rope_sin: (>= seq, d/2) tables of cos/sin(pos * theta^(-2k/d)), or
    None for no RoPE. Returns (batch, heads, seq, d), laid out as (batch, seq, heads, d) in memory so the caller's
    transpose(1, 2).reshape(batch, seq, heads * d) is free. Gradients are w.r.t. the unrotated q and k.
    bf16 and fp16 are the intended dtypes; float32 inputs use TF32 tensor cores on the GPU, RoPE applied in torch.
    """
    batch, n_heads, seq, d = q.shape
    if k.shape != v.shape or k.shape[0] != batch or k.shape[2:] != q.shape[2:] or n_heads % k.shape[1]:
        raise ValueError(f"attention needs q (B, H, T, d) and k, v (B, H_kv, T, d) with H % H_kv == 0, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if (rope_cos is None) != (rope_sin is None):
        raise ValueError("attention needs both rope_cos and rope_sin, or neither")
    if rope_cos is not None and (d % 2 or rope_cos.shape[0] < seq or rope_cos.shape[1:] != (d // 2,)
                                 or rope_sin.shape != rope_cos.shape):
        raise ValueError(f"attention needs even d and rope tables of shape (>= {seq}, {d // 2}), got d={d}, "
                         f"{tuple(rope_cos.shape)} and {tuple(rope_sin.shape)}")
    if not _use_triton(q) or (INTERPRET and q.dtype == torch.bfloat16):  # the interpreter's tl.dot multiplies
        return attention_reference(q, k, v, causal, rope_cos, rope_sin)  # bf16 bit patterns as integers
    if rope_cos is not None and q.dtype == torch.float32:  # the fused RoPE's float32 backward does not compile for
        q, k = rope_reference(q, rope_cos[:seq], rope_sin[:seq]), rope_reference(k, rope_cos[:seq], rope_sin[:seq])
        rope_cos = rope_sin = None  # sm_90 ("Illegal shared layout"): rotate in torch, autograd rotates dq, dk back
    return _Attention.apply(q, k, v, causal, rope_cos, rope_sin)


# ----------------------------------------------------------------------------------------------------------------
# Output projection + cross-entropy, chunked
# ----------------------------------------------------------------------------------------------------------------

def linear_cross_entropy_reference(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                   softcap: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean cross-entropy, mean logsumexp^2) of logits = h @ weight^T (soft-capped when softcap > 0), with
    float32 logits for every row at once."""
    logits = h @ weight.t()  # (..., vocab)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if softcap > 0:
        logits = softcap * torch.tanh(logits / softcap)
    lse = torch.logsumexp(logits, dim=-1)
    ce = lse - logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return ce.mean(), lse.pow(2).mean()


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The matmul dtype: autocast's when it is on for x's device, else x's own."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


class _LinearCrossEntropy(torch.autograd.Function):
    """Forward per chunk of rows: logits in float32, lse, loss terms, and D = (softmax - onehot) * cap' (cap' the
    soft-cap's slope, 1 without it) stored in the matmul dtype: the logit gradient of the summed cross-entropy.

    With upstream gradients g_ce, g_z and n rows the logit gradient is a_i D_ij + b_i onehot_ij, where
    a_i = (g_ce + 2 g_z lse_i) / n and b_i = 2 g_z lse_i cap'_i,target / n, so the backward is the two matmuls
    D @ W and D^T @ (a * h) plus a gather and a scatter of n rows for the z-loss's onehot term."""

    @staticmethod
    def forward(ctx, h, weight, targets, softcap, chunk_rows):
        dtype = _compute_dtype(h)
        acc_dtype = torch.promote_types(dtype, torch.float32)  # float32, or float64 for float64 inputs
        with torch.autocast(h.device.type, enabled=False):
            h_c, w_c = h.to(dtype), weight.to(dtype)
            n, vocab = h.shape[0], weight.shape[0]
            grad_logits = torch.empty(n, vocab, dtype=dtype, device=h.device)  # D above
            lse = torch.empty(n, dtype=acc_dtype, device=h.device)
            target_logit = torch.empty_like(lse)
            target_slope = torch.ones_like(lse)
            vocab_ids = torch.arange(vocab, device=h.device)
            for i in range(0, n, chunk_rows):
                rows, t = slice(i, i + chunk_rows), targets[i:i + chunk_rows, None]
                logits = (h_c[rows] @ w_c.t()).to(acc_dtype)  # (chunk, vocab)
                if softcap > 0:
                    logits = softcap * torch.tanh(logits / softcap)
                lse[rows] = torch.logsumexp(logits, dim=-1)
                target_logit[rows] = logits.gather(1, t).squeeze(1)
                grad = torch.exp(logits - lse[rows, None]) - (vocab_ids == t).to(acc_dtype)  # pointwise: fuses
                if softcap > 0:
                    slope = 1.0 - (logits / softcap).pow(2)
                    target_slope[rows] = slope.gather(1, t).squeeze(1)
                    grad = grad * slope
                grad_logits[rows] = grad
        ctx.save_for_backward(h_c, w_c, targets, grad_logits, lse, target_slope)
        ctx.h_dtype, ctx.w_dtype = h.dtype, weight.dtype
        return (lse - target_logit).mean(), lse.pow(2).mean()

    @staticmethod
    def backward(ctx, g_ce, g_z):
        h_c, w_c, targets, grad_logits, lse, target_slope = ctx.saved_tensors
        n = h_c.shape[0]
        a = (g_ce + 2 * g_z * lse) / n  # (n,)
        b = (2 * g_z * lse * target_slope / n)[:, None]  # (n, 1)
        dh = a[:, None] * (grad_logits @ w_c).to(a.dtype) + b * w_c[targets].to(a.dtype)
        dw = (grad_logits.t() @ (a[:, None] * h_c).to(h_c.dtype)).to(a.dtype)
        dw = dw.index_add_(0, targets, b * h_c.to(a.dtype))
        return dh.to(ctx.h_dtype), dw.to(ctx.w_dtype), None, None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, softcap: float = 0.0,
                         chunk_rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean cross-entropy, mean logsumexp^2) of logits = h @ weight^T, soft-capped to softcap * tanh(. / softcap)
    when softcap > 0, without float32 logits for more than chunk_rows rows at a time (default: 2^25 logits).

    h: (..., d); weight: (vocab, d); targets: (...) int64. Matmuls run in autocast's dtype when it is on.
    Plain torch, so it runs on any device; the z term is for the z-loss (ce + c * z).
    """
    if h.shape[:-1] != targets.shape or h.shape[-1] != weight.shape[1]:
        raise ValueError(f"linear_cross_entropy needs h (..., d), weight (vocab, d), targets (...), got "
                         f"{tuple(h.shape)}, {tuple(weight.shape)}, {tuple(targets.shape)}")
    chunk_rows = chunk_rows or max(1, 2**25 // weight.shape[0])
    return _LinearCrossEntropy.apply(h.reshape(-1, h.shape[-1]), weight, targets.reshape(-1), softcap, chunk_rows)
