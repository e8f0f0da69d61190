"""Truncation of the sampling distribution: min-p, top-k and top-p, vectorised over rows.

The order follows vLLM: temperature, then min-p, then top-k, then top-p (computed on what
top-k left). Every function works in place on a [rows, vocab] tensor of scaled logits and
sets excluded tokens to -inf.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

_NEG_INF = float("-inf")
# Candidate set sizes tried for top-p before the whole vocabulary is sorted.
_NUCLEUS_CANDIDATES = (256, 4096)


def apply_min_p(logits: torch.Tensor, min_p: Sequence[float]) -> None:
    """Exclude tokens whose probability is below ``min_p`` times the top token's probability."""
    threshold = torch.tensor(min_p, dtype=logits.dtype, device=logits.device).unsqueeze(1)
    probs = torch.softmax(logits, dim=-1)
    top_prob = probs.max(dim=-1, keepdim=True).values
    # Rows with min_p == 0 get a zero threshold and lose nothing.
    logits.masked_fill_(probs < threshold * top_prob, _NEG_INF)


def apply_top_k_top_p(logits: torch.Tensor, top_k: Sequence[int], top_p: Sequence[float]) -> None:
    """Keep each row's ``top_k`` most likely tokens (0: all), then its top-p nucleus.

    Rows that only need top-k use a partial ``topk``; rows with top-p < 1 go through
    ``_apply_nucleus``, which avoids sorting the whole vocabulary when it can.
    """
    vocab_size = logits.shape[1]
    k_only_rows = [
        i
        for i, (k, p) in enumerate(zip(top_k, top_p, strict=True))
        if 0 < k < vocab_size and p >= 1
    ]
    nucleus_rows = [i for i, p in enumerate(top_p) if p < 1]
    if k_only_rows:
        _apply_top_k(logits, k_only_rows, [top_k[i] for i in k_only_rows])
    if nucleus_rows:
        ks = [top_k[i] if 0 < top_k[i] < vocab_size else vocab_size for i in nucleus_rows]
        _apply_nucleus(logits, nucleus_rows, ks, [top_p[i] for i in nucleus_rows])


def _apply_top_k(logits: torch.Tensor, rows: list[int], ks: list[int]) -> None:
    device = logits.device
    row_index = torch.tensor(rows, dtype=torch.long, device=device)
    sub = logits.index_select(0, row_index)
    k = torch.tensor(ks, dtype=torch.long, device=device).unsqueeze(1)
    top_values = sub.topk(max(ks), dim=-1).values
    kth_value = top_values.gather(1, k - 1)
    # Ties with the k-th value are kept, as in vLLM; this may keep slightly more than k tokens.
    sub.masked_fill_(sub < kth_value, _NEG_INF)
    logits.index_copy_(0, row_index, sub)


def _apply_nucleus(logits: torch.Tensor, rows: list[int], ks: list[int], ps: list[float]) -> None:
    """Top-k then top-p, looking at the most likely candidates first.

    A full sort of the vocabulary is the expensive part. The nucleus usually lies within the
    few hundred most likely tokens, so those are taken with a partial ``topk``; rows whose
    candidates do not cover ``top_p`` of the mass try a larger candidate set, and finally
    the whole (sorted) vocabulary.
    """
    device = logits.device
    vocab_size = logits.shape[1]
    row_index = torch.tensor(rows, dtype=torch.long, device=device)
    sub = logits.index_select(0, row_index)
    probs = torch.softmax(sub, dim=-1)
    result = torch.full_like(sub, _NEG_INF)
    pending = list(range(len(rows)))
    largest_k = max([0, *(k for k in ks if k < vocab_size)])
    for num_candidates in (*_NUCLEUS_CANDIDATES, vocab_size):
        num_candidates = min(vocab_size, max(num_candidates, largest_k))
        covered = _nucleus_over_candidates(
            sub[pending],
            probs[pending],
            [ks[i] for i in pending],
            [ps[i] for i in pending],
            num_candidates,
            result,
            pending,
        )
        pending = [row for row, done in zip(pending, covered, strict=True) if not done]
        if not pending:
            break
    logits.index_copy_(0, row_index, result)


def _nucleus_over_candidates(
    sub: torch.Tensor,
    probs: torch.Tensor,
    ks: list[int],
    ps: list[float],
    num_candidates: int,
    result: torch.Tensor,
    result_rows: list[int],
) -> list[bool]:
    """Write the filtered logits of the rows whose nucleus lies within their
    ``num_candidates`` most likely tokens into ``result``; return which rows those were."""
    device = sub.device
    vocab_size = sub.shape[1]
    top_probs, top_index = probs.topk(num_candidates, dim=-1)
    k = torch.tensor(ks, dtype=torch.long, device=device).unsqueeze(1)
    p = torch.tensor(ps, dtype=probs.dtype, device=device).unsqueeze(1)
    positions = torch.arange(num_candidates, device=device).unsqueeze(0)
    top_probs.masked_fill_(positions >= k, 0.0)
    kept_mass = top_probs.sum(dim=-1, keepdim=True)
    # With top-k active, top-p applies to the distribution renormalised over the k tokens.
    has_top_k = k < vocab_size
    normaliser = torch.where(has_top_k, kept_mass, torch.ones_like(kept_mass))
    # A token stays when the mass of the tokens ranked above it is still below top_p, so the
    # most likely token always stays.
    mass_above = (top_probs.cumsum(dim=-1) - top_probs) / normaliser
    keep = (mass_above < p) & (positions < k)
    candidate_logits = sub.gather(1, top_index).masked_fill_(~keep, _NEG_INF)
    filtered = torch.full_like(sub, _NEG_INF).scatter_(1, top_index, candidate_logits)
    # The first token beyond the candidates has at least kept_mass above it.
    covered = has_top_k | (kept_mass >= p) | (num_candidates == vocab_size)
    covered_list = covered.squeeze(1).tolist()
    done = [i for i, ok in enumerate(covered_list) if ok]
    if done:
        target = torch.tensor([result_rows[i] for i in done], dtype=torch.long, device=device)
        result.index_copy_(0, target, filtered[done])
    return covered_list
