"""Chat prompts the way the model was trained to read them: its own Jinja chat template, rendered as HF does.

Where a template comes from, first match wins (the order transformers loads them in):
`chat_template.jinja` in the model directory, then `chat_template` in tokenizer_config.json (a string, or
a list of named templates, of which `default` is used). A model with neither gets `ROLE_TAGS`, a plain
`<|role|>` template. The environment matches transformers' `apply_chat_template`: a sandboxed, immutable
Jinja environment with `trim_blocks`/`lstrip_blocks`, the `loopcontrols` extension, `{% generation %}`
blocks, `raise_exception`, `strftime_now`, a `tojson` that does not HTML-escape, and the tokenizer's special
tokens (`bos_token`, `eos_token`, ...) as variables.

Workers tokenize a prompt with the tokenizer's special tokens (as for /v1/completions), so when the
tokenizer itself prepends BOS, a BOS the template writes first is dropped here rather than sent twice.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

TemplateSource = Literal["chat_template.jinja", "tokenizer_config.json", "role-tags"]
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
ROLE_TAGS = "{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}\n{% endfor %}" \
            "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"


class ChatTemplateError(ValueError):
    """A model's chat template cannot be loaded (bad JSON, a Jinja syntax error); names the file."""


class ChatRenderError(ValueError):
    """The template refused these messages (its `raise_exception`, or an error while rendering)."""


class _Generation(jinja2.ext.Extension):
    # HF templates mark assistant turns with {% generation %}...{% endgeneration %} for training masks;
    # serving only needs the text inside.
    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return dt.datetime.now().strftime(fmt)


def _environment() -> ImmutableSandboxedEnvironment:
    # A template ships with downloaded weights: untrusted code, hence the sandbox.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
    return env


@dataclass(frozen=True)
class ChatTemplate:
    """A compiled chat template, where it came from, and the special tokens it is rendered with."""

    source: TemplateSource
    text: str
    special_tokens: Mapping[str, str] = field(default_factory=dict)
    drop_leading_bos: bool = False
    _compiled: jinja2.Template = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        try:
            compiled = _environment().from_string(self.text)
        except jinja2.TemplateSyntaxError as exc:
            raise ChatTemplateError(f"chat template from {self.source}: line {exc.lineno}: {exc.message}") from None
        object.__setattr__(self, "_compiled", compiled)

    @classmethod
    def role_tags(cls) -> ChatTemplate:
        """The fallback for models without a template of their own."""
        return cls("role-tags", ROLE_TAGS)

    @classmethod
    def for_model(cls, model_dir: str | Path | None) -> ChatTemplate:
        """The model's own template if its directory has one, else `role_tags()`."""
        if model_dir is None:
            return cls.role_tags()
        model_dir = Path(model_dir)
        config = _read_json(model_dir / "tokenizer_config.json")
        tokens = _special_tokens(config)
        drop_bos = "bos_token" in tokens and _tokenizer_adds_bos(model_dir, tokens["bos_token"])
        jinja_file = model_dir / "chat_template.jinja"
        if jinja_file.is_file():
            return cls("chat_template.jinja", jinja_file.read_text(), tokens, drop_bos)
        text = _config_template(config, model_dir / "tokenizer_config.json")
        if text is None:
            return cls.role_tags()
        return cls("tokenizer_config.json", text, tokens, drop_bos)

    def render(self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True) -> str:
        """The prompt text for `messages` (dicts with `role` and `content`, as HF takes them)."""
        try:
            text = self._compiled.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                         **self.special_tokens)
        except jinja2.TemplateError as exc:
            raise ChatRenderError(f"the model's chat template rejected the messages: {exc}") from None
        bos = self.special_tokens.get("bos_token")
        if self.drop_leading_bos and bos and text.startswith(bos):
            text = text[len(bos):]
        return text


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ChatTemplateError(f"{path}: not valid JSON: {exc}") from None
    return data if isinstance(data, dict) else {}


def _config_template(config: Mapping[str, Any], path: Path) -> str | None:
    template = config.get("chat_template")
    if template is None or isinstance(template, str):
        return template
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        if isinstance(named.get("default"), str):
            return named["default"]
        raise ChatTemplateError(f"{path}: chat_template lists templates {sorted(map(str, named))} but no "
                                f"'default' one")
    raise ChatTemplateError(f"{path}: chat_template must be a string or a list of named templates")


def _special_tokens(config: Mapping[str, Any]) -> dict[str, str]:
    tokens = {}
    for name in SPECIAL_TOKENS:
        value = config.get(name)
        if isinstance(value, dict):  # the AddedToken form: {"content": "<s>", "lstrip": false, ...}
            value = value.get("content")
        if isinstance(value, str):
            tokens[name] = value
    return tokens


def _tokenizer_adds_bos(model_dir: Path, bos: str) -> bool:
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        return False
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path))
    bos_id = tok.token_to_id(bos)
    return bos_id is not None and tok.encode("", add_special_tokens=True).ids[:1] == [bos_id]
