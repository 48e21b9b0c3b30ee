"""Shared-prefix attention (prefix tuning): the public functional entry point and the fake kernels."""
import torch

from .. import _extension
from . import reference
from ._args import as_float, check_dropout_p, check_flag, check_tensors


def prefix_attention(q, k, v, prefix_k, prefix_v, *, attn_mask=None, is_causal=False, scale=None, dropout_p=0.0,
                     training=True):
    """Softmax attention over `cat([prefix, k])`, computed without that concatenation or a per-row prefix copy.

    `q [B, Hq, L, D]`, `k, v [B, Hkv, S, D]` (Hq a multiple of Hkv), `prefix_k, prefix_v [Hkv, P, D]` shared by every
    row (or `[B, Hkv, P, D]`), `attn_mask [B, S]` bool over the sequence keys (True = attend). Prefix keys are always
    visible; `is_causal` applies within the sequence part, aligned to its end. `dropout_p` (when `training`) drops
    attention probabilities as SDPA's does, with the shared counter-based mask (KERNELS.md): its seed comes from
    torch's generator, the mask is regenerated in backward and never stored."""
    check_tensors("prefix_attention", ("attn_mask",), q=q, k=k, v=v, prefix_k=prefix_k, prefix_v=prefix_v,
                  attn_mask=attn_mask)
    is_causal = check_flag("prefix_attention", "is_causal", is_causal)
    training = check_flag("prefix_attention", "training", training)
    scale = None if scale is None else as_float("prefix_attention", "scale", scale)
    dropout_p = as_float("prefix_attention", "dropout_p", dropout_p)
    if _extension.use_kernels(q.device):
        return torch.ops.peftops.prefix_attention(q, k, v, prefix_k, prefix_v, attn_mask=attn_mask,
                                                  is_causal=is_causal, scale=scale, dropout_p=dropout_p,
                                                  training=training)
    _extension.check_like_kernels("prefix_attention", q, k, v, prefix_k, prefix_v, attn_mask=attn_mask,
                                  is_causal=is_causal, scale=scale, training=False)
    check_dropout_p("prefix_attention", "dropout_p", dropout_p, training)
    seed = reference.draw_seed(q.device, dropout_p, training)
    return reference.prefix_attention(q, k, v, prefix_k, prefix_v, attn_mask, is_causal, scale,
                                      dropout_p if seed is not None else 0.0, seed)


if _extension.LOADED:

    @torch.library.register_fake("peftops::prefix_attention_forward")
    def _forward_fake(q, k, v, prefix_k, prefix_v, attn_mask, is_causal, scale, dropout_p, seed):
        B, H, L, D = q.shape  # the output in SDPA's memory layout, [B, L, H, D] transposed
        return q.new_empty((B, L, H, D)).transpose(1, 2), q.new_empty(
            (B, H, L), dtype=torch.float64 if q.dtype == torch.float64 else torch.float32)

    @torch.library.register_fake("peftops::prefix_attention_backward")
    def _backward_fake(grad_out, q, k, v, prefix_k, prefix_v, out, lse, attn_mask, is_causal, scale, dropout_p, seed):
        sdpa_layout = [t.new_empty((t.shape[0], t.shape[2], t.shape[1], t.shape[3])).transpose(1, 2) for t in (q, k, v)]
        return (*sdpa_layout, prefix_k.new_empty(prefix_k.shape), prefix_v.new_empty(prefix_v.shape))
