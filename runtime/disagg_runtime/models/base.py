"""What the engine expects of a model: packed-token forward over the paged cache, then logits."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import torch
from torch import nn

from .config import ModelConfig

if TYPE_CHECKING:
    from ..engine.attention import AttentionContext


class CausalLM(nn.Module, ABC):
    """A decoder-only LM whose parameter names match the HF checkpoint of the same architecture."""

    config: ModelConfig
    lm_head: nn.Linear

    @abstractmethod
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionContext) -> torch.Tensor:
        """Hidden states [T, hidden] for packed tokens [T] at `positions` [T]; KV goes through `attn`."""

    @abstractmethod
    def input_embedding(self) -> nn.Embedding:
        """The token embedding (the LM head ties to it when the config says so)."""

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 logits [N, vocab] for hidden states [N, hidden]."""
        # The LM head gets a 3-D tensor because DeepSpeed's tensor-parallel LM head slices dim 2.
        return self.lm_head(hidden[None])[0].float()

    def tie_weights(self) -> None:
        """Share the LM head with the input embedding when the config says so."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.input_embedding().weight

    def init_buffers(self) -> None:
        """Recompute non-persistent buffers once the module has real storage on its device."""
