"""Tokenizer and chat template of a model folder (tokenizer.json + tokenizer_config.json)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

from tokenizers import Tokenizer as HFTokenizer


class TokenizerError(ValueError):
    pass


class ChatTemplate:
    """A Jinja2 chat template, rendered in a sandbox as HuggingFace renders it.

    >>> ChatTemplate("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}").render(
    ...     [{"role": "user", "content": "hi"}], add_generation_prompt=False)
    '<user>hi'
    """

    def __init__(self, source: str, special_tokens: dict[str, str] | None = None):
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str):
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False, **_: json.dumps(
            x, indent=indent, ensure_ascii=ensure_ascii)
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        self.source = source
        self.special_tokens = special_tokens or {}
        try:
            self.template = env.from_string(source)
        except TemplateError as e:
            raise TokenizerError(f"chat template does not compile: {e}") from None

    def render(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True, **extra: Any) -> str:
        from jinja2 import TemplateError

        try:
            return self.template.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                        **self.special_tokens, **extra)
        except TemplateError as e:
            raise TokenizerError(f"chat template: {e}") from None


@dataclass(frozen=True)
class SpecialTokens:
    bos_id: int | None
    eos_ids: tuple[int, ...]
    add_bos: bool


class Tokenizer:
    def __init__(self, model_dir: str | Path):
        model_dir = Path(model_dir)
        tokenizer_file = model_dir / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise TokenizerError(f"{model_dir}: no tokenizer.json")
        try:
            self.backend = HFTokenizer.from_file(str(tokenizer_file))
        except Exception as e:  # the tokenizers library raises a bare Exception on bad files
            raise TokenizerError(f"{tokenizer_file}: unreadable ({e})") from None
        cfg_file = model_dir / "tokenizer_config.json"
        cfg: dict[str, Any] = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
        gen_file = model_dir / "generation_config.json"
        gen: dict[str, Any] = json.loads(gen_file.read_text()) if gen_file.is_file() else {}

        def token_text(value: Any) -> str | None:
            return value.get("content") if isinstance(value, dict) else value

        bos_text, eos_text = token_text(cfg.get("bos_token")), token_text(cfg.get("eos_token"))
        eos_ids = []
        if eos_text is not None and self.backend.token_to_id(eos_text) is not None:
            eos_ids.append(self.backend.token_to_id(eos_text))
        gen_eos = gen.get("eos_token_id")
        for e in (gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else []):
            if e not in eos_ids:
                eos_ids.append(int(e))
        self.special = SpecialTokens(
            bos_id=self.backend.token_to_id(bos_text) if bos_text else None,
            eos_ids=tuple(eos_ids),
            add_bos=bool(cfg.get("add_bos_token", False)),
        )
        template_source = cfg.get("chat_template")
        template_file = model_dir / "chat_template.jinja"
        if template_source is None and template_file.is_file():
            template_source = template_file.read_text()
        if isinstance(template_source, list):  # named templates: take the default one
            template_source = next((t["template"] for t in template_source if t.get("name") == "default"), None)
        self.chat_template = ChatTemplate(template_source, {"bos_token": bos_text or "", "eos_token": eos_text or ""}) \
            if template_source else None

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`; special tokens written in the text are recognised. BOS is prepended
        when the model's tokenizer config asks for it (or add_bos says so)."""
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if (self.special.add_bos if add_bos is None else add_bos) and self.special.bos_id is not None:
            ids = [self.special.bos_id] + ids
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def apply_chat_template(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        if self.chat_template is None:
            raise TokenizerError("this model has no chat template; pass raw text instead")
        return self.chat_template.render(messages, add_generation_prompt=add_generation_prompt)
