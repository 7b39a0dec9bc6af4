"""Token selection for a batch of rows with per-request parameters.

Greedy rows are one batched argmax. Sampled rows apply temperature and top-p, then draw with a
generator seeded from (request seed, token index): the same request gives the same tokens whatever
it is batched with, and whether its decode runs on the engine that prefilled it or on another one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .types import SamplingParams

_SEED_STRIDE = 1_000_003  # a prime, so (seed, index) pairs map to distinct generator seeds


def step_seed(seed: int, token_index: int) -> int:
    """Generator seed for the `token_index`-th output token of a request seeded with `seed`."""
    return (seed * _SEED_STRIDE + token_index) % (1 << 63)


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero the tail of a probability row outside the smallest set whose mass reaches `top_p`."""
    if top_p >= 1.0:
        return probs
    sorted_probs, order = probs.sort(descending=True)
    # A token is dropped when the mass strictly before it already reaches top_p (the top token always stays).
    drop = (sorted_probs.cumsum(-1) - sorted_probs) >= top_p
    sorted_probs = sorted_probs.masked_fill(drop, 0.0)
    return torch.zeros_like(probs).scatter_(-1, order, sorted_probs)


def sample(logits: torch.Tensor, params: Sequence[SamplingParams], token_indices: Sequence[int],
           fallback: torch.Generator) -> list[int]:
    """One token id per row of float logits [B, vocab].

    `token_indices[i]` is how many tokens row i's request has produced so far; unseeded requests
    draw from `fallback`.
    """
    return sample_ids(logits, params, token_indices, fallback).tolist()


def sample_ids(logits: torch.Tensor, params: Sequence[SamplingParams], token_indices: Sequence[int],
               fallback: torch.Generator) -> torch.Tensor:
    """As `sample`, but the ids stay where the logits are (int64 [B]): nothing waits for the device, so an
    overlapped decode step can feed them to the next step before the host has read them."""
    chosen = logits.argmax(dim=-1)
    sampled_rows = [i for i, p in enumerate(params) if p.temperature > 0]
    for i in sampled_rows:
        p = params[i]
        probs = top_p_filter(torch.softmax(logits[i] / p.temperature, dim=-1), p.top_p)
        if p.seed is None:
            gen = fallback
        else:
            gen = torch.Generator(device=logits.device).manual_seed(step_seed(p.seed, token_indices[i]))
        chosen[i] = torch.multinomial(probs, 1, generator=gen)[0]
    return chosen
