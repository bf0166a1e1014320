"""`linear_cross_entropy`: LM head matmul + token cross-entropy without full-vocabulary logits.

Legend: N tokens, D hidden width, V vocabulary, T tokens of one chunk.

The (N, V) logits of a whole batch are the largest activation of a language model (at N = 16K
tokens and V = 32K they are 2 GiB in fp32, twice that with their gradient). This op walks the
tokens in chunks of T: per chunk it computes the (T, V) logits in fp32, the summed loss, and at
once the gradients with respect to the hidden states and the head weight (softmax - one-hot,
times the inputs), then drops the logits. Only dh (N, D) and dW (V, D) are kept for backward,
which scales them by the incoming gradient (the loss is a scalar).

Computing the gradients in the forward, rather than saving nothing and recomputing the logits
in backward, does three matmuls per chunk instead of four (the logits are not computed twice):
the head is matmul-bound, so this is the faster choice; the cost is keeping dW (V, D, fp32) from
forward to backward, as large as the fp32 weight. Under `torch.no_grad` (or when neither input
needs a gradient) only the loss is computed.

Under autocast the matmuls run in the autocast dtype (bf16) and the softmax in fp32, as
`F.cross_entropy(lm_head(h).float(), ...)` does; the weight gradient accumulates in fp32.

Implementations: "torch" (this file; plain PyTorch, matmul-bound, any device).
"""

from __future__ import annotations

import torch
from torch import Tensor

from hybrid.ops._registry import define_op

# Auto chunk: at most this many fp32 logits per chunk (2^28 = 1 GiB).
_CHUNK_ELEMENTS = 1 << 28
_CHUNK_MULTIPLE = 256


def auto_chunk_tokens(n_tokens: int, vocab: int) -> int:
    """Tokens per chunk so a chunk's fp32 logits stay under 1 GiB (a multiple of 256 when
    that is smaller than `n_tokens`)."""
    chunk = max(_CHUNK_MULTIPLE, (_CHUNK_ELEMENTS // max(vocab, 1)) // _CHUNK_MULTIPLE * 256)
    return max(1, min(n_tokens, chunk))


def _compute_dtype(x: Tensor) -> torch.dtype:
    """The matmul dtype: the autocast dtype when autocast is on for x's device (and x is a
    floating type autocast would cast), else x's own dtype."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev) and x.dtype in (torch.float32, torch.float16, torch.bfloat16):
        return torch.get_autocast_dtype(dev)
    return x.dtype


def _chunk_loss_and_grad(
    h_TD: Tensor, w_VD: Tensor, labels_T: Tensor, ignore_index: int, need_grad: bool
) -> tuple[Tensor, Tensor | None]:
    """Summed CE of one chunk and, if asked, d(sum CE)/d(logits) (T, V) in the logits dtype."""
    logits_TV = h_TD @ w_VD.T
    logits_TV = logits_TV.to(torch.promote_types(logits_TV.dtype, torch.float32))
    valid_T = labels_T != ignore_index
    target_T = torch.where(valid_T, labels_T, 0)
    lse_T = torch.logsumexp(logits_TV, dim=-1)
    picked_T = logits_TV.gather(1, target_T[:, None]).squeeze(1)
    loss = torch.where(valid_T, lse_T - picked_T, 0.0).sum()
    if not need_grad:
        return loss, None
    grad_TV = logits_TV.sub_(lse_T[:, None]).exp_()  # softmax, in place of the logits
    grad_TV.scatter_add_(1, target_T[:, None], torch.full_like(picked_T[:, None], -1.0))
    grad_TV.mul_(valid_T[:, None].to(grad_TV.dtype))
    return loss, grad_TV


def _chunked_loss_and_grads(
    h_ND: Tensor,
    w_VD: Tensor,
    labels_N: Tensor,
    ignore_index: int,
    chunk_tokens: int,
    need_h: bool,
    need_w: bool,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """(summed CE, dh (N, D) in h's dtype or None, dw (V, D) fp32 or None), chunk by chunk."""
    cdtype = _compute_dtype(h_ND)
    with torch.autocast(h_ND.device.type, enabled=False):
        h_c, w_c = h_ND.to(cdtype), w_VD.to(cdtype)
        acc_dtype = torch.promote_types(cdtype, torch.float32)
        loss = torch.zeros((), device=h_ND.device, dtype=acc_dtype)
        dh = torch.empty_like(h_ND) if need_h else None
        dw = torch.zeros(w_VD.shape, device=w_VD.device, dtype=acc_dtype) if need_w else None
        for start in range(0, h_ND.shape[0], chunk_tokens):
            sl = slice(start, start + chunk_tokens)
            part, g_TV = _chunk_loss_and_grad(
                h_c[sl], w_c, labels_N[sl], ignore_index, need_h or need_w
            )
            loss += part
            if g_TV is None:
                continue
            g_TV = g_TV.to(cdtype)
            if dh is not None:
                dh[sl] = g_TV @ w_c
            if dw is not None:
                dw.add_(g_TV.T @ h_c[sl])
    return loss, dh, dw


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_ND, w_VD, labels_N, ignore_index, chunk_tokens):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        loss, dh, dw = _chunked_loss_and_grads(
            h_ND, w_VD, labels_N, ignore_index, chunk_tokens, need_h, need_w
        )
        ctx.save_for_backward(dh, dw)
        ctx.w_dtype = w_VD.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        dh, dw = ctx.saved_tensors
        grad_h = dh * grad_loss.to(dh.dtype) if dh is not None else None
        grad_w = (dw * grad_loss.to(dw.dtype)).to(ctx.w_dtype) if dw is not None else None
        return grad_h, grad_w, None, None, None


def linear_cross_entropy_torch(
    h_ND: Tensor,
    weight_VD: Tensor,
    labels_N: Tensor,
    *,
    ignore_index: int = -100,
    chunk_tokens: int | None = None,
) -> Tensor:
    """Plain-PyTorch chunked implementation (see `linear_cross_entropy`)."""
    if h_ND.ndim != 2 or weight_VD.ndim != 2 or h_ND.shape[1] != weight_VD.shape[1]:
        raise ValueError(
            f"linear_cross_entropy: expected h (N, D) and weight (V, D), got "
            f"{tuple(h_ND.shape)} and {tuple(weight_VD.shape)}"
        )
    if labels_N.shape != h_ND.shape[:1]:
        raise ValueError(
            f"linear_cross_entropy: labels {tuple(labels_N.shape)} do not match h's "
            f"{h_ND.shape[0]} tokens"
        )
    if chunk_tokens is None:
        chunk_tokens = auto_chunk_tokens(h_ND.shape[0], weight_VD.shape[0])
    if chunk_tokens <= 0:
        raise ValueError(f"linear_cross_entropy: chunk_tokens must be positive, got {chunk_tokens}")
    if not (torch.is_grad_enabled() and (h_ND.requires_grad or weight_VD.requires_grad)):
        args = (h_ND, weight_VD, labels_N, ignore_index, chunk_tokens, False, False)
        return _chunked_loss_and_grads(*args)[0]
    return _LinearCrossEntropy.apply(h_ND, weight_VD, labels_N, ignore_index, chunk_tokens)


LINEAR_CROSS_ENTROPY = define_op("linear_cross_entropy")
LINEAR_CROSS_ENTROPY.register("torch", linear_cross_entropy_torch)


def linear_cross_entropy(
    h: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    ignore_index: int = -100,
    chunk_tokens: int | None = None,
    impl: str | None = None,
) -> Tensor:
    """Sum over tokens with a label of cross_entropy(h @ weight.T, labels), never holding the
    full (N, V) logits.

    Shapes: h (N, D), weight (V, D), labels (N,) int64 (`ignore_index` = no loss).
    Returns a scalar: fp32 (fp64 for fp64 inputs); 0 when no token has a label. Gradients flow
    to h and weight (a tied embedding weight accumulates them as usual). `chunk_tokens`: tokens
    per chunk (default: logits of a chunk under 1 GiB in fp32).
    """
    fn = LINEAR_CROSS_ENTROPY.select(h.device, impl).fn
    return fn(h, weight, labels, ignore_index=ignore_index, chunk_tokens=chunk_tokens)


__all__ = [
    "LINEAR_CROSS_ENTROPY",
    "auto_chunk_tokens",
    "linear_cross_entropy",
    "linear_cross_entropy_torch",
]
