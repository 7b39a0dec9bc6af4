"""The model's own chat template, rendered as transformers renders it; the role-tag fallback; the router's use."""

from __future__ import annotations

import json

import aiohttp
import pytest
from disagg_runtime.chat_template import ROLE_TAGS, ChatRenderError, ChatTemplate, ChatTemplateError
from disagg_runtime.models.testing import write_random_model
from disagg_runtime.router.app import Router, RouterConfig
from disagg_runtime.serve.runner import start_site
from test_router import FakeWorker

# A template of our own in the style of Llama-2/Mistral ones: BOS first, system folded into the first user
# turn, strict alternation enforced with raise_exception, EOS after assistant turns, trim/lstrip reliant.
TEMPLATE = """{{ bos_token }}
{% if messages[0]['role'] == 'system' %}
    {% set system = messages[0]['content'] %}{% set rest = messages[1:] %}
{% else %}
    {% set system = none %}{% set rest = messages %}
{% endif %}
{% for message in rest %}
    {% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {% endif %}
    {% if message['role'] == 'user' %}
[INST] {% if loop.first and system %}<<SYS>>{{ system }}<</SYS>> {% endif %}{{ message['content'] | trim }} [/INST]
    {% else %}
{% generation %} {{ message['content'] | trim }}{% endgeneration %}{{ eos_token }}
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}<ASSISTANT>{% endif %}"""

CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"}, {"role": "user", "content": "  2+2? "}]


def _model(tmp_path, *, config_template=TEMPLATE, jinja_file: str | None = None, name="m"):
    model_dir = write_random_model(tmp_path / name)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>",
              "eos_token": {"__type": "AddedToken", "content": "</s>", "lstrip": False, "rstrip": False,
                            "normalized": False, "single_word": False, "special": True}, "unk_token": "<unk>"}
    if config_template is not None:
        config["chat_template"] = config_template
    (model_dir / "tokenizer_config.json").write_text(json.dumps(config))
    if jinja_file is not None:
        (model_dir / "chat_template.jinja").write_text(jinja_file)
    return model_dir


def test_renders_the_model_template_exactly_as_transformers_does(tmp_path):
    from transformers import AutoTokenizer

    model_dir = _model(tmp_path)
    hf = AutoTokenizer.from_pretrained(str(model_dir))
    ours = ChatTemplate.for_model(model_dir)
    assert ours.source == "tokenizer_config.json"
    for add in (True, False):
        expected = hf.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=add)
        assert expected.startswith("<s>")
        # This tokenizer prepends BOS itself when the worker encodes the prompt, so the router drops the
        # template's: the token ids the worker ends up with are transformers' apply_chat_template(tokenize=True).
        assert ours.render(CHAT, add_generation_prompt=add) == expected.removeprefix("<s>")
        ids = hf(ours.render(CHAT, add_generation_prompt=add)).input_ids
        assert ids == hf.apply_chat_template(CHAT, tokenize=True, add_generation_prompt=add, return_dict=False)
    assert ours.render(CHAT).endswith("[INST] 2+2? [/INST]\n<ASSISTANT>")
    assert "[INST] <<SYS>>be brief<</SYS>> hi [/INST]\n hello</s>" in ours.render(CHAT)


def test_template_errors_are_the_clients_to_fix(tmp_path):
    ours = ChatTemplate.for_model(_model(tmp_path))
    with pytest.raises(ChatRenderError, match="roles must alternate"):
        ours.render([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


def test_the_sandbox_holds(tmp_path):
    escape = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(ChatRenderError):
        ChatTemplate.for_model(_model(tmp_path, config_template=escape)).render(CHAT)
    mutate = "{% set _ = messages.append(1) %}{{ messages | length }}"
    with pytest.raises(ChatRenderError):
        ChatTemplate.for_model(_model(tmp_path, config_template=mutate, name="m2")).render(CHAT)


def test_chat_template_jinja_file_wins_over_the_config(tmp_path):
    from transformers import AutoTokenizer

    jinja = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{{ eos_token }}\n{% endfor %}" \
            "{% if add_generation_prompt %}<assistant>{% endif %}"
    model_dir = _model(tmp_path, jinja_file=jinja)
    ours = ChatTemplate.for_model(model_dir)
    assert ours.source == "chat_template.jinja"
    expected = AutoTokenizer.from_pretrained(str(model_dir)).apply_chat_template(CHAT, tokenize=False,
                                                                                add_generation_prompt=True)
    assert ours.render(CHAT) == expected
    assert ours.render(CHAT).startswith("<system>be brief</s>\n")


def test_named_templates_use_the_default_one(tmp_path):
    named = [{"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": "{{ messages[0].content }}"}]
    assert ChatTemplate.for_model(_model(tmp_path, config_template=named)).render(CHAT) == "be brief"
    with pytest.raises(ChatTemplateError, match="no 'default'"):
        ChatTemplate.for_model(_model(tmp_path, config_template=[{"name": "x", "template": "y"}], name="m2"))


def test_models_without_a_template_get_role_tags(tmp_path):
    for model_dir in (None, _model(tmp_path, config_template=None), write_random_model(tmp_path / "bare")):
        t = ChatTemplate.for_model(model_dir)
        assert t.source == "role-tags" and t.text == ROLE_TAGS
    assert ChatTemplate.role_tags().render(CHAT[:2]) == "<|system|>\nbe brief\n<|user|>\nhi\n<|assistant|>\n"


def test_a_broken_template_fails_at_load_naming_where(tmp_path):
    with pytest.raises(ChatTemplateError, match="tokenizer_config.json: line 1"):
        ChatTemplate.for_model(_model(tmp_path, config_template="{% for m in messages %}"))


class RecordingPrefill(FakeWorker):
    """A fake prefill worker that keeps the prompts the router sent it."""

    def __init__(self) -> None:
        super().__init__("prefill")
        self.prompts: list[str] = []

    async def prefill(self, request):
        self.prompts.append((await request.json())["prompt"])
        return await super().prefill(request)


@pytest.mark.parametrize("with_template", [True, False])
async def test_router_uses_the_template_and_says_which(tmp_path, with_template):
    model_dir = _model(tmp_path) if with_template else write_random_model(tmp_path / "bare")
    prefill, decode = RecordingPrefill(), FakeWorker("decode")
    runners = []
    for w in (prefill, decode):
        runner, port = await start_site(w.app(), "127.0.0.1", 0)
        runners.append(runner)
        w.url = f"127.0.0.1:{port}"
    router = Router(RouterConfig(prefill=[prefill.url], decode=[decode.url], poll_s=0.1, model_path=str(model_dir)))
    runner, port = await start_site(router.app(), "127.0.0.1", 0)
    runners.append(runner)
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as s:
            async with s.get(f"{url}/v1/models") as resp:
                card = (await resp.json())["data"][0]
            async with s.post(f"{url}/v1/chat/completions", json={"messages": CHAT, "max_tokens": 5}) as resp:
                assert resp.status == 200, await resp.text()
            bad = {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "max_tokens": 5}
            async with s.post(f"{url}/v1/chat/completions", json=bad) as resp:
                bad_status, bad_body = resp.status, await resp.json()
    finally:
        for r in reversed(runners):
            await r.cleanup()
    expected = ChatTemplate.for_model(model_dir).render(CHAT)
    assert prefill.prompts[0] == expected
    if with_template:
        assert card["chat_template"] == "tokenizer_config.json" and expected.lstrip().startswith("[INST]")
        assert bad_status == 400 and "roles must alternate" in bad_body["error"]["message"]
        assert len(prefill.prompts) == 1, "a refused conversation never reaches a worker"
    else:
        assert card["chat_template"] == "role-tags" and expected.startswith("<|system|>")
        assert bad_status == 200

