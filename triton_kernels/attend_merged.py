"""Triton: biased GQA attention over merged entries (online softmax), returning out and lse.

A program owns BLOCK_M query rows of one kv head, packed GQA style: row r of kv head g is
(query r // G, query head g * G + r % G), so the G heads sharing a kv head share every K/V
tile load. It walks one split of the entries in BLOCK_N tiles with an online softmax in the
log2 domain (fp32 max, sum and accumulator). When the grid would leave SMs idle the entries
are split (flash-decoding): each split writes a normalised partial out and its lse, and a
second kernel combines them by their lse weights.

Precision: q.k is a tensor-core dot with fp32 accumulation when q and keys share fp16/bf16
(products exact), else an fp32 "ieee" dot; weights @ values rounds the weights to the
values' fp16/bf16 dtype (fp32 values: fp32 "ieee" dot), as flash attention does.

Functions:
    attend_merged_triton(q, keys, values, bias, scale, splits=None, interpret=False)
                                                   (out fp32 [Q, Hq, D], lse fp32 [Q, Hq])
    plan(Q, Hq, Hkv, E, D, device, splits=None)      (BLOCK_M, BLOCK_N, BLOCK_D, num_warps, splits, per_split)
"""
import functools

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
HALF = (torch.float16, torch.bfloat16)
MAX_SPLITS = 4096  # grid z stays under CUDA's 65535


@triton.jit
def _attend_kernel(q_ptr, k_ptr, v_ptr, b_ptr, o_ptr, lse_ptr, Q, E, G, Hq, per_split,
                   s_qq, s_qh, s_kh, s_ke, s_vh, s_ve, s_bh, s_be, s_os, s_ls, qk_scale,
                   D: tl.constexpr, QK_F32: tl.constexpr, PV_F32: tl.constexpr, UPCAST: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    # grid (cdiv(Q * G, BLOCK_M), Hkv, splits). o/lse: contiguous [Q, Hq, D] / [Q, Hq] per split,
    # split stride s_os / s_ls. D is constexpr, so the head-dim mask folds away when D == BLOCK_D
    # (one compile per head size). UPCAST: run the fp16/bf16 dots on fp32 copies of the same values
    # (Triton's interpreter multiplies bf16 as its raw uint16 bits).
    kv = tl.program_id(1)
    split = tl.program_id(2)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < Q * G
    qi = rows // G
    h = kv * G + rows % G
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    q_off = qi.to(tl.int64) * s_qq + h.to(tl.int64) * s_qh
    qt = tl.load(q_ptr + q_off[:, None] + d[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0)
    if QK_F32:
        qt = qt.to(tl.float32)
    kv64 = kv.to(tl.int64)
    start = split * per_split
    end = tl.minimum(start + per_split, E)
    n = tl.arange(0, BLOCK_N)
    e_first = (start + n).to(tl.int64)
    k_ptrs = k_ptr + kv64 * s_kh + e_first[:, None] * s_ke + d[None, :]  # advanced tile by tile
    v_ptrs = v_ptr + kv64 * s_vh + e_first[:, None] * s_ve + d[None, :]
    b_ptrs = b_ptr + kv64 * s_bh + e_first * s_be
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for e0 in range(start, end, BLOCK_N):
        emask = e0 + n < end
        kvmask = emask[:, None] & dmask[None, :]
        kt = tl.load(k_ptrs, mask=kvmask, other=0.0)
        if QK_F32:
            s = tl.dot(qt, tl.trans(kt.to(tl.float32)), input_precision="ieee")
        elif UPCAST:  # same numbers as the half dot: its products are exact in fp32
            s = tl.dot(qt.to(tl.float32), tl.trans(kt.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(qt, tl.trans(kt))
        b = tl.load(b_ptrs, mask=emask, other=float("-inf"))
        s = s * qk_scale + (b * 1.4426950408889634)[None, :]  # logits * log2(e)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # all -inf so far: weights 0, not NaN
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        vt = tl.load(v_ptrs, mask=kvmask, other=0.0)
        if PV_F32:
            acc = tl.dot(p, vt.to(tl.float32), acc * alpha[:, None], input_precision="ieee")
        elif UPCAST:
            acc = tl.dot(p.to(vt.dtype).to(tl.float32), vt.to(tl.float32), acc * alpha[:, None],
                         input_precision="ieee")
        else:
            acc = tl.dot(p.to(vt.dtype), vt, acc * alpha[:, None])
        m_i = m_new
        k_ptrs += BLOCK_N * s_ke
        v_ptrs += BLOCK_N * s_ve
        b_ptrs += BLOCK_N * s_be
    has = l_i > 0.0
    l_safe = tl.where(has, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(has, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    o_row = qi.to(tl.int64) * Hq + h
    split64 = split.to(tl.int64)
    tl.store(o_ptr + split64 * s_os + o_row[:, None] * D + d[None, :], out, mask=rmask[:, None] & dmask[None, :])
    tl.store(lse_ptr + split64 * s_ls + o_row, lse, mask=rmask)


@triton.jit
def _combine_kernel(po_ptr, pl_ptr, o_ptr, lse_ptr, S, n_rows, D: tl.constexpr,
                    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    # grid (n_rows,): one row of [Q * Hq]; partials po [S, n_rows, D], pl [S, n_rows], BLOCK_S
    # splits at a time. out = sum_s w_s po_s / sum_s w_s, w_s = exp(lse_s - max lse).
    row = tl.program_id(0).to(tl.int64)
    sp = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    m_vec = tl.full([BLOCK_S], float("-inf"), tl.float32)
    for s0 in range(0, S, BLOCK_S):
        part = (s0 + sp).to(tl.int64) * n_rows + row
        m_vec = tl.maximum(m_vec, tl.load(pl_ptr + part, mask=s0 + sp < S, other=float("-inf")))
    m = tl.max(m_vec, axis=0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)  # every split empty: weights 0
    w_vec = tl.zeros([BLOCK_S], tl.float32)
    acc = tl.zeros([BLOCK_D], tl.float32)
    for s0 in range(0, S, BLOCK_S):
        smask = s0 + sp < S
        part = (s0 + sp).to(tl.int64) * n_rows + row
        w = tl.exp(tl.load(pl_ptr + part, mask=smask, other=float("-inf")) - m_safe)
        po = tl.load(po_ptr + part[:, None] * D + d[None, :], mask=smask[:, None] & dmask[None, :], other=0.0)
        acc += tl.sum(w[:, None] * po, axis=0)
        w_vec += w
    total = tl.sum(w_vec, axis=0)
    has = total > 0.0
    t_safe = tl.where(has, total, 1.0)
    tl.store(o_ptr + row * D + d, acc / t_safe, mask=dmask)
    tl.store(lse_ptr + row, tl.where(has, m_safe + tl.log(t_safe), float("-inf")))


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def plan(Q: int, Hq: int, Hkv: int, E: int, D: int, device: torch.device, splits: int | None = None):
    """Launch shape: (BLOCK_M, BLOCK_N, BLOCK_D, num_warps, splits, entries per split).

    Splits (unless given) fill about two programs per SM, each split keeping >= 4 entry tiles;
    every split holds >= 1 entry (E == 0: one split).
    """
    block_d = max(16, triton.next_power_of_2(D))
    cap_m, block_n, warps = (64, 64, 4) if block_d <= 128 else ((64, 32, 8) if block_d <= 256 else (16, 16, 4))
    block_m = min(cap_m, max(16, triton.next_power_of_2(max(1, Q * (Hq // Hkv)))))
    tiles = triton.cdiv(E, block_n)
    if splits is None:
        programs = triton.cdiv(Q * (Hq // Hkv), block_m) * Hkv
        splits = min(triton.cdiv(2 * _sm_count(device), max(1, programs)), triton.cdiv(tiles, 4))
    splits = max(1, min(int(splits), tiles, MAX_SPLITS))
    per_split = max(1, triton.cdiv(tiles, splits)) * block_n
    splits = max(1, triton.cdiv(E, per_split))  # no split left empty by the rounding up
    return block_m, block_n, block_d, warps, splits, per_split


def _check(q, keys, values, bias) -> None:
    if q.dim() != 3 or (q.shape[2] > 1 and q.stride(2) != 1):
        raise ValueError(f"attend_merged: q shape {tuple(q.shape)} strides {q.stride()}: must be [Q, Hq, D] "
                         "with unit stride along D")
    Q, Hq, D = q.shape
    for name, t in (("keys", keys), ("values", values)):
        if t.dim() != 3 or t.shape != keys.shape or t.shape[2] != D or (D > 1 and t.stride(2) != 1):
            raise ValueError(f"attend_merged: {name} shape {tuple(t.shape)} strides {t.stride()}: must be "
                             f"[Hkv, E, {D}] like keys {tuple(keys.shape)}, unit stride along D")
    Hkv, E, _ = keys.shape
    if Hkv == 0 or Hq % Hkv != 0 or D < 1:
        raise ValueError(f"attend_merged: q {tuple(q.shape)} vs keys {tuple(keys.shape)}: Hq must be a multiple "
                         "of Hkv and D >= 1")
    if bias.shape != (Hkv, E) or bias.dtype != torch.float32:
        raise ValueError(f"attend_merged: bias {tuple(bias.shape)} {bias.dtype} must be fp32 [Hkv={Hkv}, E={E}]")
    if keys.dtype not in (*HALF, torch.float32) or values.dtype != keys.dtype or q.dtype not in (*HALF, torch.float32):
        raise ValueError(f"attend_merged: dtypes q {q.dtype}, keys {keys.dtype}, values {values.dtype} "
                         "must be fp16/bf16/fp32, keys and values one dtype")
    if not (q.device == keys.device == values.device == bias.device):
        raise ValueError("attend_merged: q, keys, values and bias must be on one device")


def attend_merged_triton(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor,
                         scale: float, splits: int | None = None, interpret: bool = False):
    """q [Q, Hq, D], keys/values [Hkv, E, D] (any strides, unit stride along D), bias fp32 [Hkv, E]
    (any strides). `splits` forces the number of entry splits (tests); `interpret`: running under
    TRITON_INTERPRET=1, whose bf16 tl.dot is wrong, so bf16 dots run on exact fp32 copies."""
    _check(q, keys, values, bias)
    Q, Hq, D = q.shape
    Hkv, E, _ = keys.shape
    out = torch.empty((Q, Hq, D), dtype=torch.float32, device=q.device)
    lse = torch.empty((Q, Hq), dtype=torch.float32, device=q.device)
    if Q * Hq == 0:
        return out, lse
    block_m, block_n, block_d, warps, n_split, per_split = plan(Q, Hq, Hkv, E, D, q.device, splits)
    G = Hq // Hkv
    if n_split == 1:
        po, pl = out, lse
    else:
        po = torch.empty((n_split, Q, Hq, D), dtype=torch.float32, device=q.device)
        pl = torch.empty((n_split, Q, Hq), dtype=torch.float32, device=q.device)
    qk_f32 = not (q.dtype == keys.dtype and q.dtype in HALF)
    grid = (triton.cdiv(Q * G, block_m), Hkv, n_split)
    _attend_kernel[grid](q, keys, values, bias, po, pl, Q, E, G, Hq, per_split,
                         q.stride(0), q.stride(1), keys.stride(0), keys.stride(1), values.stride(0),
                         values.stride(1), bias.stride(0), bias.stride(1), Q * Hq * D, Q * Hq, scale * LOG2E,
                         D=D, QK_F32=qk_f32, PV_F32=values.dtype == torch.float32,
                         UPCAST=bool(interpret) and torch.bfloat16 in (q.dtype, keys.dtype),
                         BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
                         num_warps=warps, num_stages=2)
    if n_split > 1:
        _combine_kernel[(Q * Hq,)](po, pl, out, lse, n_split, Q * Hq, D=D, BLOCK_S=16, BLOCK_D=block_d)
    return out, lse
