"""Plain-PyTorch references of every op: the tests compare the kernels against these, and they serve as the
opt-in fallback (PEFTOPS_FALLBACK=1). They follow ../shared/KERNELS.md literally, materialising what the
kernels avoid (masks, concatenations)."""
import numpy as np
import torch
import torch.nn.functional as F

_M0, _M1, _W0, _W1 = 0xD2511F53, 0xCD9E8D57, 0x9E3779B9, 0xBB67AE85
_MASK32 = np.uint64(0xFFFFFFFF)


def philox4x32_10(counter_lo, counter_hi, key):
    """Philox-4x32-10 on numpy uint64 arrays of 64-bit counters, one 64-bit key; returns four uint32 words."""
    lo = np.asarray(counter_lo, dtype=np.uint64)
    hi = np.broadcast_to(np.asarray(counter_hi, dtype=np.uint64), lo.shape)
    c0, c1 = lo & _MASK32, lo >> np.uint64(32)
    c2, c3 = hi & _MASK32, hi >> np.uint64(32)
    key = int(key) & 0xFFFFFFFFFFFFFFFF
    k0, k1 = key & 0xFFFFFFFF, key >> 32
    for _ in range(10):
        p0 = np.uint64(_M0) * c0
        p1 = np.uint64(_M1) * c2
        c0, c1, c2, c3 = ((p1 >> np.uint64(32)) ^ c1 ^ np.uint64(k0), p1 & _MASK32,
                          (p0 >> np.uint64(32)) ^ c3 ^ np.uint64(k1), p0 & _MASK32)
        k0, k1 = (k0 + _W0) & 0xFFFFFFFF, (k1 + _W1) & 0xFFFFFFFF
    return c0, c1, c2, c3


def dropout_threshold(p: float) -> int:
    t = p * 4294967296.0
    return 0xFFFFFFFF if t >= 4294967295.0 else int(t)


def dropout_keep_mask(shape, p: float, seed, offset: int = 0) -> torch.Tensor:
    """The keep-mask (True = kept) that the kernels regenerate for a [..., ] tensor of `shape`, row-major."""
    seed = int(seed.item()) if isinstance(seed, torch.Tensor) else int(seed)
    n = int(np.prod(shape, dtype=np.int64)) if len(shape) else 1
    idx = np.arange(n, dtype=np.uint64)
    words = np.stack(philox4x32_10(idx >> np.uint64(2), offset, seed), axis=-1)
    word = words[np.arange(n), (idx & np.uint64(3)).astype(np.int64)]
    return torch.from_numpy(word >= np.uint64(dropout_threshold(p))).reshape(tuple(shape))


def apply_dropout(x: torch.Tensor, p: float, seed) -> torch.Tensor:
    if p == 0.0 or seed is None:
        return x
    keep = dropout_keep_mask(x.shape, p, seed).to(x.device)
    return x * keep.to(x.dtype) / (1.0 - p)


def philox_dropout(p: float, seed):
    """The kernels' dropout for `seed` as a function of its input, or None when no dropout runs."""
    return None if p == 0.0 or seed is None else lambda x: apply_dropout(x, p, seed)


def _linear(weight, bias, base=None):
    """x -> x W^T + b, or the base layer itself where it has a forward of its own or hooks (peft calls it)."""
    return base if base is not None else lambda x: F.linear(x, weight, bias)


def lora_composed(x, weight, bias, lora_a, lora_b, scale, drop=None, base=None):
    """peft's LoRA forward, x W^T + b + scale * drop(x) A^T B^T (`drop` the dropout, None for none), with the weight
    used as given: a trainable one gets its gradient (the layers' path for that case); `base`: see _linear."""
    return _linear(weight, bias, base)(x) + scale * F.linear(F.linear(x if drop is None else drop(x), lora_a), lora_b)


def lora_linear(x, weight, bias, lora_a, lora_b, scale, dropout_p=0.0, seed=None):
    """x W^T + b + scale * dropout(x) A^T B^T; the mask is the kernels' Philox mask for `seed`."""
    return lora_composed(x, weight.detach(), bias, lora_a, lora_b, scale, philox_dropout(dropout_p, seed))


def draw_seed(device, p: float, training: bool):
    """The dropout seed an op draws from torch's generator for `device` (None when no dropout runs)."""
    return torch.randint(2**63 - 1, (), device=device) if training and p > 0.0 else None


def bias_linear(x, weight, bias):
    return F.linear(x, weight.detach(), bias)


def bias_dropout_add(x, bias, residual, p=0.0, seed=None):
    return residual + apply_dropout(x + bias, p, seed)


def ia3_composed(x, weight, bias, ia3_scale, feedforward=False, base=None):
    """peft's IA3: output scaling `(x W^T + b) * l`, or input scaling `(x * l) W^T + b` for feed-forward layers, with
    the weight used as given (a trainable one gets its gradient); `base`: see _linear."""
    l, linear = ia3_scale.reshape(-1), _linear(weight, bias, base)
    return linear(x * l) if feedforward else linear(x) * l


def ia3_linear(x, weight, bias, ia3_scale, feedforward=False):
    return ia3_composed(x, weight.detach(), bias, ia3_scale, feedforward)


def ia3_glu_linear(gate, up, weight, bias, ia3_scale):
    """peft's IA3 on a gated feed-forward block's down projection: `((gate * up) * l) W^T + b`."""
    return ia3_composed(gate * up, weight.detach(), bias, ia3_scale, feedforward=True)


def multi_lora_linear(x, weight, bias, lora_a, lora_b, scales, adapter_index):
    """Every token row i gets `scales[a] * x_i A_a^T B_a^T` added for its adapter a = adapter_index[i] (-1: none)."""
    y = F.linear(x, weight.detach(), bias)
    x2, y2 = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
    for a in range(lora_a.shape[0]):
        rows = (adapter_index == a).unsqueeze(1)
        # other adapters' rows are zeroed before the product too: a NaN there must not reach this adapter's gradients
        delta = scales[a] * F.linear(F.linear(torch.where(rows, x2, 0), lora_a[a]), lora_b[a])
        y2 = y2 + torch.where(rows, delta, torch.zeros_like(delta))
    return y2.reshape(y.shape)


def dora_linear(x, weight, bias, lora_a, lora_b, magnitude, scale, dropout_p=0.0, seed=None):
    return dora_composed(x, weight.detach(), bias, lora_a, lora_b, magnitude, scale, philox_dropout(dropout_p, seed))


def dora_composed(x, weight, bias, lora_a, lora_b, magnitude, scale, drop=None, base=None):
    """peft's DoRA, literally (peft/tuners/lora/dora.py): the norm of W + s B A is detached; with dropout (`drop`),
    the base output of the dropped input is recomputed from the weight, as peft does. The weight is used as given;
    `base`: see _linear."""
    norm = torch.linalg.norm(weight + scale * (lora_b @ lora_a).detach(), dim=1).detach()
    g = magnitude / norm
    result = _linear(weight, bias, base)(x)
    if drop is not None:
        x = drop(x)
        base = F.linear(x, weight)
    else:
        base = result - bias if bias is not None else result
    return result + (g - 1) * base + g * F.linear(F.linear(x, lora_a), lora_b) * scale


ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "gelu_tanh": lambda a: F.gelu(a, approximate="tanh"), "silu": F.silu}


def adapter_bottleneck(h, w_down, b_down, w_up, b_up, activation="relu", scale=1.0, residual=None):
    """residual + scale * (act(h Wd^T + bd) Wu^T + bu), residual defaulting to h (AdapterHub's composition)."""
    up = F.linear(ACTIVATIONS[activation](F.linear(h, w_down, b_down)), w_up, b_up)
    return (h if residual is None else residual) + scale * up


def concatenated_prefix(q, k, v, prefix_k, prefix_v, attn_mask=None, is_causal=False):
    """(keys, values, allowed) of attention over cat([prefix, k]): the prefix expanded over the batch, the kv heads
    repeated for grouped-query attention, and the [B, 1, L, P + S] mask of the keys each query sees (the prefix
    always; `attn_mask` and `is_causal` over the sequence part)."""
    B, Hq, L, _ = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    if prefix_k.dim() == 3:
        prefix_k, prefix_v = (t.unsqueeze(0).expand(B, *t.shape) for t in (prefix_k, prefix_v))
    P = prefix_k.shape[2]
    keys, values = torch.cat([prefix_k, k], 2), torch.cat([prefix_v, v], 2)
    if Hq != Hkv:
        keys, values = (t.repeat_interleave(Hq // Hkv, dim=1) for t in (keys, values))
    allowed = torch.ones(B, 1, L, S, dtype=torch.bool, device=q.device)
    if attn_mask is not None:
        allowed = allowed & attn_mask[:, None, None, :]
    if is_causal:  # aligned to the end of the sequence: query l sees keys j <= l + S - L
        allowed = allowed & torch.ones(L, S, dtype=torch.bool, device=q.device).tril(S - L)
    allowed = torch.cat([torch.ones(B, 1, L, P, dtype=torch.bool, device=q.device), allowed], -1)
    return keys, values, allowed


def prefix_attention(q, k, v, prefix_k, prefix_v, attn_mask=None, is_causal=False, scale=None, dropout_p=0.0,
                     seed=None):
    """Softmax attention over cat([prefix, k]) with the prefix expanded over the batch and the kv heads repeated for
    grouped-query attention: what peftops.ops.prefix_attention computes without building any of it. With a dropout
    seed, the probabilities [B, Hq, L, P + S] go through the kernels' mask."""
    keys, values, allowed = concatenated_prefix(q, k, v, prefix_k, prefix_v, attn_mask, is_causal)
    if dropout_p == 0.0 or seed is None:
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=allowed, scale=scale)
    scores = (q @ keys.transpose(-1, -2)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1)
    return apply_dropout(probs, dropout_p, seed) @ values
