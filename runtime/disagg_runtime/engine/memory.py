"""How many KV blocks an engine gets when the caller does not say."""

from __future__ import annotations

import os

import torch

# On CPU the cache shares RAM with everything else on the host and a CPU engine serves tests and
# development, so it is capped at this many full-length sequences rather than filling the machine.
CPU_MAX_FULL_SEQUENCES = 64


class KVMemoryError(RuntimeError):
    """There is not enough memory left for even one KV block."""


def available_bytes(device: torch.device) -> int:
    """Bytes the KV cache may still take on `device` (before applying the memory fraction)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def plan_num_blocks(device: torch.device, *, bytes_per_block: int, block_size: int, max_context: int,
                    memory_fraction: float) -> int:
    """Blocks that fit in `memory_fraction` of the device memory left after the weights.

    On CUDA the fraction applies to the whole card and what is already in use (weights, the
    allocator's cache) is subtracted, as a serving process owns its GPU.
    """
    if not 0 < memory_fraction <= 1:
        raise ValueError(f"kv_memory_fraction must be in (0, 1], got {memory_fraction}")
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        budget = int(total * memory_fraction) - (total - free)
    else:
        budget = int(available_bytes(device) * memory_fraction)
        cap = CPU_MAX_FULL_SEQUENCES * -(-max_context // block_size) * bytes_per_block
        budget = min(budget, cap)
    blocks = budget // bytes_per_block
    if blocks < 1:
        raise KVMemoryError(
            f"no memory left for the KV cache on {device} (budget {budget / 2**20:.0f} MiB, one block needs "
            f"{bytes_per_block / 2**20:.2f} MiB); raise kv_memory_fraction or use a smaller model/dtype")
    return blocks
