"""Prompts of a given token length for a server whose tokenizer the client does not have.

`ids` sends the prompt as token ids (OpenAI's completions API accepts a list of ints), which makes the
length exact on any server that takes them (ours, vLLM). Ids are drawn from [3, 259): every byte-level
BPE vocabulary has them and they avoid the usual special-token ids 0-2. `words` sends text of common
English words, about one token each for GPT-style tokenizers: for servers that accept only text.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

PromptMode = Literal["ids", "words"]
_LOW_ID, _HIGH_ID = 3, 259
_WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at which but have an they "
    "you were her she there been one all we their has would when if so no will more can out up into said what "
    "its about than them only time could new some these two may first then do any like other very after over "
    "years most where also made through back much before good well our way even because just those people how "
    "too little state great under world life still being same last never work long between both each many "
    "might while place house during number part right small found again against large without point water "
    "system thing group often case fact power given every high order plan model token serve memory request"
).split()


def make_prompt(length: int, mode: PromptMode, rng: np.random.Generator) -> str | list[int]:
    """A prompt of about `length` tokens (exactly, in `ids` mode)."""
    if length < 1:
        raise ValueError(f"prompt length must be >= 1, got {length}")
    if mode == "ids":
        return [int(i) for i in rng.integers(_LOW_ID, _HIGH_ID, size=length)]
    if mode == "words":
        return " ".join(_WORDS[i] for i in rng.integers(0, len(_WORDS), size=length))
    raise ValueError(f"unknown prompt mode {mode!r}: use ids or words")
