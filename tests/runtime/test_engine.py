"""Engine: token equality with HF generate, KV export/import, continuous batching, sampling, stops, lifecycle."""

from __future__ import annotations

import json

import pytest
import torch
from disagg_runtime.engine import (
    DuplicateRequest,
    Engine,
    GenerationRequest,
    InvalidRequest,
    SamplingParams,
    UnknownRequest,
)
from disagg_runtime.models.testing import write_random_model

transformers = pytest.importorskip("transformers")

PROMPT_LENGTHS = (3, 11, 29, 50)


def _prompts(seed: int, lengths=PROMPT_LENGTHS) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(4, 512, (n,), generator=gen).tolist() for n in lengths]


def _requests(prompts, prefix="r", **sampling) -> list[GenerationRequest]:
    return [GenerationRequest(f"{prefix}{i}", p, SamplingParams(**sampling)) for i, p in enumerate(prompts)]


def _hf_greedy(model_dir, prompts, max_new_tokens: int) -> list[list[int]]:
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    outs = []
    for p in prompts:
        with torch.no_grad():
            out = hf.generate(torch.tensor([p]), max_new_tokens=max_new_tokens, do_sample=False)
        outs.append(out[0, len(p):].tolist())
    return outs


def _solo(model_dir, req: GenerationRequest) -> list[int]:
    return Engine.load(model_dir, num_blocks=64).generate([req])[req.request_id]


@pytest.mark.parametrize("variant", ["llama", "llama3", "opt"])
def test_greedy_batch_equals_transformers_generate(model_dirs, variant):
    model_dir = model_dirs[variant]
    prompts = _prompts(7)
    engine = Engine.load(model_dir, num_blocks=64, block_size=8)
    ours = engine.generate(_requests(prompts, max_tokens=24))
    want = _hf_greedy(model_dir, prompts, 24)
    assert [ours[f"r{i}"] for i in range(len(prompts))] == want
    assert engine.free_blocks == engine.total_blocks and engine.num_running == 0


@pytest.mark.parametrize("variant", ["llama", "opt"])
def test_kv_exported_after_prefill_continues_in_a_fresh_engine(model_dirs, variant):
    model_dir = model_dirs[variant]
    prompts = _prompts(8)
    reqs = _requests(prompts, max_tokens=20)
    prefill_engine = Engine.load(model_dir, num_blocks=32)
    firsts = prefill_engine.prefill(reqs, reserve_decode=False)
    decode_engine = Engine.load(model_dir, num_blocks=64)
    streams = {o.request_id: [o.token_id] for o in firsts}
    texts = {o.request_id: o.text for o in firsts}
    for req, first in zip(reqs, firsts, strict=True):
        payload = prefill_engine.export_kv(req.request_id)
        assert payload.header.num_tokens == len(req.prompt_ids)
        prefill_engine.release(req.request_id)
        decode_engine.import_kv(req, payload, first.token_id)
    assert prefill_engine.free_blocks == prefill_engine.total_blocks
    while decode_engine.num_running:
        for out in decode_engine.decode():
            streams[out.request_id].append(out.token_id)
            texts[out.request_id] += out.text
    want = _hf_greedy(model_dir, prompts, 20)
    assert [streams[r.request_id] for r in reqs] == want
    for r in reqs:  # streamed deltas add up to the decoded output, across the hand-over
        assert texts[r.request_id] == decode_engine.tokenizer.decode(streams[r.request_id])


def test_requests_joining_and_leaving_mid_decode_match_solo_runs(llama_dir):
    prompts = _prompts(9, lengths=(4, 17, 33, 8, 21))
    reqs = [GenerationRequest(f"c{i}", p, SamplingParams(max_tokens=m))
            for i, (p, m) in enumerate(zip(prompts, (30, 6, 18, 25, 12), strict=True))]
    solo = {r.request_id: _solo(llama_dir, r) for r in reqs}
    engine = Engine.load(llama_dir, num_blocks=96, block_size=4)
    arrivals = {0: [reqs[0], reqs[1]], 3: [reqs[2]], 7: [reqs[3], reqs[4]]}  # decode step -> requests arriving
    got: dict[str, list[int]] = {}
    step = 0
    while step in arrivals or engine.num_running:
        for out in engine.prefill(arrivals.get(step, [])):
            got[out.request_id] = [out.token_id]
        for out in engine.decode():
            got[out.request_id].append(out.token_id)
        step += 1
    assert got == solo
    assert engine.free_blocks == engine.total_blocks


def test_aborting_one_request_leaves_the_others_unchanged(llama_dir):
    reqs = _requests(_prompts(10), max_tokens=16)
    solo = {r.request_id: _solo(llama_dir, r) for r in reqs}
    engine = Engine.load(llama_dir, num_blocks=64)
    got = {o.request_id: [o.token_id] for o in engine.prefill(reqs)}
    for step in range(15):
        if step == 4:
            assert engine.abort("r1") and not engine.abort("r1")
        for out in engine.decode():
            got[out.request_id].append(out.token_id)
    assert len(got.pop("r1")) == 5
    assert got == {k: v for k, v in solo.items() if k != "r1"}
    assert engine.free_blocks == engine.total_blocks


def test_seeded_sampling_is_reproducible_across_batching_and_hand_over(llama_dir):
    prompt = _prompts(11)[2]
    sampled = SamplingParams(max_tokens=24, temperature=1.0, top_p=0.9, seed=1234)
    alone = _solo(llama_dir, GenerationRequest("s", prompt, sampled))
    engine = Engine.load(llama_dir, num_blocks=64)
    batch = _requests(_prompts(12), prefix="other", max_tokens=24, temperature=0.7, seed=5)
    batched = engine.generate([*batch, GenerationRequest("s", prompt, sampled)])["s"]
    assert batched == alone
    # Prefill on one engine, decode on another: the same tokens again.
    a, b = Engine.load(llama_dir, num_blocks=16), Engine.load(llama_dir, num_blocks=16)
    req = GenerationRequest("s", prompt, sampled)
    first = a.prefill([req], reserve_decode=False)[0].token_id
    b.import_kv(req, a.export_kv("s"), first)
    tokens = [first]
    while b.num_running:
        tokens += [o.token_id for o in b.decode()]
    assert tokens == alone
    other_seed = _solo(llama_dir, GenerationRequest("s", prompt, SamplingParams(max_tokens=24, temperature=1.0,
                                                                                 top_p=0.9, seed=99)))
    assert other_seed != alone
    greedy = _solo(llama_dir, GenerationRequest("g", prompt, SamplingParams(max_tokens=24)))
    nucleus_of_one = _solo(llama_dir, GenerationRequest("g", prompt, SamplingParams(max_tokens=24, temperature=1.0,
                                                                                    top_p=1e-6, seed=3)))
    assert nucleus_of_one == greedy


def test_stop_string_ends_the_request_and_is_never_streamed(llama_dir):
    engine = Engine.load(llama_dir, num_blocks=64)
    prompt = _prompts(13)[1]
    full_ids = engine.generate([GenerationRequest("x", prompt, SamplingParams(max_tokens=30))])["x"]
    full = engine.tokenizer.decode(full_ids)
    # A stop string straddling two tokens: its first character arrives one step before the rest.
    ends = [len(engine.tokenizer.decode(full_ids[: i + 1])) for i in range(len(full_ids))]
    stop = next(full[e - 1: e + 2] for e, nxt in zip(ends[2:], ends[3:], strict=False)
                if nxt - e >= 2 and "\ufffd" not in full[e - 1: e + 2] and full.index(full[e - 1: e + 2]) == e - 1)
    outs = engine.prefill([GenerationRequest("x", prompt, SamplingParams(max_tokens=30, stop=["\x00no", stop]))])
    while engine.num_running:
        outs += engine.decode()
    text = "".join(o.text for o in outs)
    assert text == full[: full.index(stop)]
    streamed = ""
    for o in outs:
        streamed += o.text
        assert stop not in streamed
    assert outs[-1].finished and outs[-1].finish_reason == "stop"
    assert [o.token_id for o in outs] == full_ids[: len(outs)] and len(outs) < len(full_ids)


def test_eos_stops_generation_unless_ignored(llama_dir, tmp_path):
    prompt = _prompts(14)[3]
    free_run = _solo(llama_dir, GenerationRequest("e", prompt, SamplingParams(max_tokens=20)))
    eos = free_run[6]
    first_hit = free_run.index(eos)
    config = json.loads((llama_dir / "config.json").read_text())
    eos_dir = write_random_model(tmp_path / "eos", arch="llama", seed=1, eos_token_id=eos)
    assert json.loads((eos_dir / "config.json").read_text())["hidden_size"] == config["hidden_size"]
    engine = Engine.load(eos_dir, num_blocks=64)
    outs = []
    engine.prefill([GenerationRequest("e", prompt, SamplingParams(max_tokens=20))])
    while engine.num_running:
        outs += engine.decode()
    assert [o.token_id for o in outs][-1] == eos and len(outs) == first_hit
    assert outs[-1].finish_reason == "stop"
    assert [free_run[0]] + [o.token_id for o in outs] == _hf_greedy(eos_dir, [prompt], 20)[0]
    ignored = _solo(eos_dir, GenerationRequest("e", prompt, SamplingParams(max_tokens=20, ignore_eos=True)))
    assert ignored == free_run


def test_request_done_at_prefill_keeps_kv_until_released(llama_dir):
    engine = Engine.load(llama_dir, num_blocks=16)
    out = engine.prefill([GenerationRequest("one", _prompts(15)[2], SamplingParams(max_tokens=1))])[0]
    assert out.finished and out.finish_reason == "length"
    assert engine.export_kv("one").header.num_tokens == len(_prompts(15)[2])
    assert engine.free_blocks < engine.total_blocks
    assert engine.decode() == []  # a decode step releases requests that are done
    assert engine.free_blocks == engine.total_blocks


def test_lifecycle_errors_name_the_request(llama_dir):
    engine = Engine.load(llama_dir, num_blocks=16)
    engine.prefill([GenerationRequest("a", [5, 6, 7])])
    with pytest.raises(DuplicateRequest, match="'a'"):
        engine.prefill([GenerationRequest("a", [5, 6])])
    with pytest.raises(DuplicateRequest, match="repeat"):
        engine.prefill([GenerationRequest("b", [5]), GenerationRequest("b", [6])])
    with pytest.raises(UnknownRequest, match="'zzz'"):
        engine.release("zzz")
    with pytest.raises(UnknownRequest):
        engine.export_kv("zzz")
    with pytest.raises(InvalidRequest, match="empty prompt"):
        engine.prefill([GenerationRequest("c", [])])
    with pytest.raises(InvalidRequest, match="outside"):
        engine.prefill([GenerationRequest("c", [1, 512])])
    for bad in (SamplingParams(max_tokens=0), SamplingParams(temperature=-1), SamplingParams(top_p=0),
                SamplingParams(stop=[""])):
        with pytest.raises(InvalidRequest):
            engine.prefill([GenerationRequest("c", [1, 2], bad)])
    assert engine.request_ids == ["a"]
    assert not engine.abort("zzz")


def test_detokenizer_streams_whole_characters_only(llama_dir):
    from disagg_runtime.engine.detokenizer import IncrementalDetokenizer

    engine = Engine.load(llama_dir, num_blocks=4)
    text = " naïve café — 東京 ok"
    ids = engine.tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) > len(text.split())  # multi-byte characters span several byte-level tokens
    detok = IncrementalDetokenizer(engine.tokenizer, engine.tokenizer.encode("Hello"), stop=[])
    deltas = []
    for i, t in enumerate(ids):
        detok.add(t)
        deltas.append(detok.delta(final=i == len(ids) - 1))
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)
