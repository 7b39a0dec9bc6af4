"""The runtime's tokenizer: a `tokenizers` tokenizer.json plus the model's special-token ids."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer


class TokenizerNotFound(FileNotFoundError):
    """The model directory has no tokenizer.json."""


class Tokenizer:
    """Text <-> token ids for one model; EOS ids come from the model config, not guesses."""

    def __init__(self, inner: HFTokenizer, *, eos_token_ids: Sequence[int] = (), bos_token_id: int | None = None):
        self.inner = inner
        self.eos_token_ids = tuple(eos_token_ids)
        self.bos_token_id = bos_token_id

    @classmethod
    def from_dir(cls, model_dir: str | Path, *, eos_token_ids: Sequence[int] | None = None,
                 bos_token_id: int | None = None) -> Tokenizer:
        """Load `model_dir/tokenizer.json`; special ids default to those in config.json."""
        path = Path(model_dir) / "tokenizer.json"
        if not path.is_file():
            raise TokenizerNotFound(
                f"{model_dir}: no tokenizer.json; export one with transformers: "
                f"AutoTokenizer.from_pretrained(...).save_pretrained('{model_dir}')")
        if eos_token_ids is None or bos_token_id is None:
            config_path = Path(model_dir) / "config.json"
            config = json.loads(config_path.read_text()) if config_path.is_file() else {}
            if eos_token_ids is None:
                eos = config.get("eos_token_id")
                eos_token_ids = [] if eos is None else (eos if isinstance(eos, list) else [eos])
            if bos_token_id is None:
                bos_token_id = config.get("bos_token_id")
        return cls(HFTokenizer.from_file(str(path)), eos_token_ids=eos_token_ids, bos_token_id=bos_token_id)

    @property
    def eos_token_id(self) -> int | None:
        """The first EOS id (models such as Llama-3-Instruct have several; see `eos_token_ids`)."""
        return self.eos_token_ids[0] if self.eos_token_ids else None

    @property
    def vocab_size(self) -> int:
        return self.inner.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return self.inner.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return self.inner.decode(list(ids), skip_special_tokens=skip_special_tokens)
