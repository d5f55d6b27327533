"""Prompt templates: turn a conversation into the exact text a model saw during fine-tuning.

A conversation is a list of `{"role": "system"|"user"|"assistant", "content": str}` messages,
the shape Hugging Face chat templates take. Prose is not a conversation and is used as is
under every template. Templates are named objects: `get_template(name, tokenizer)`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from solar_quant.errors import CalibrationError

Conversation = list[dict[str, str]]
TEMPLATE_NAMES = ("solar", "chat_template", "raw")
ROLES = ("system", "user", "assistant")


class Template(Protocol):
    name: str

    def render(self, conversation: Conversation) -> str: ...


@dataclass(frozen=True)
class SolarTemplate:
    """SOLAR-0-70b's template, as in its model card:

        ### System:\\n{system}\\n\\n### User:\\n{user}\\n\\n### Assistant:\\n{assistant}

    Blocks are joined by a blank line, turn after turn. The system block is omitted when there
    is no (or an empty) system message: the card's example prompt starts at `### User:`. A
    conversation that ends with a user turn ends with the open `### Assistant:\\n` header, the
    generation prompt of the card's example.
    """

    name: str = "solar"
    headers = {"system": "### System:", "user": "### User:", "assistant": "### Assistant:"}

    def render(self, conversation: Conversation) -> str:
        blocks = [f"{self.headers[m['role']]}\n{m['content']}" for m in conversation
                  if not (m["role"] == "system" and not m["content"].strip())]
        text = "\n\n".join(blocks)
        if conversation and conversation[-1]["role"] == "user":
            text += "\n\n" + self.headers["assistant"] + "\n"
        return text


# The Jinja form of `SolarTemplate`, written into every variant of a source that has no chat
# template, so `tokenizer.apply_chat_template` and servers (vLLM, TGI) build the prompts the
# model was tuned on. It opens with BOS exactly when calibration frames a document with BOS for a
# tokenizer without a chat template (whenever the tokenizer has one: `sampling.special_tokens`);
# so tokenize its output with `add_special_tokens=False`. `add_generation_prompt` opens the
# assistant turn, as `SolarTemplate` does after a user turn. Tested equal to `SolarTemplate`.
SOLAR_CHAT_TEMPLATE = (
    "{%- if bos_token %}{{ bos_token }}{%- endif %}"
    "{%- set headers = {'system': '### System:', 'user': '### User:', 'assistant': '### Assistant:'} %}"
    "{%- set ns = namespace(first=true) %}"
    "{%- for message in messages %}"
    "{%- if message['role'] not in headers %}"
    "{{- raise_exception('SOLAR template: role must be system, user or assistant, got ' + message['role']) }}"
    "{%- endif %}"
    "{%- if not (message['role'] == 'system' and not message['content'].strip()) %}"
    "{%- if not ns.first %}{{- '\\n\\n' }}{%- endif %}"
    "{%- set ns.first = false %}"
    "{{- headers[message['role']] + '\\n' + message['content'] }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{%- if not ns.first %}{{- '\\n\\n' }}{%- endif %}{{- '### Assistant:\\n' }}{%- endif %}"
)
CHAT_TEMPLATE_FILE = "chat_template.jinja"


def has_chat_template(folder: str | Path) -> bool:
    """Whether a model folder's tokenizer carries a chat template (files only, nothing loaded):
    `chat_template.jinja` / `chat_template.json` as transformers 5 writes them, a non-empty
    `chat_template` in `tokenizer_config.json`, or `additional_chat_templates/`."""
    folder = Path(folder)
    if (folder / CHAT_TEMPLATE_FILE).is_file() or (folder / "chat_template.json").is_file():
        return True
    if (folder / "additional_chat_templates").is_dir():
        return True
    try:
        cfg = json.loads((folder / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and bool(cfg.get("chat_template"))


@dataclass(frozen=True)
class RawTemplate:
    """Plain text: the messages' contents joined by blank lines, no role markers."""

    name: str = "raw"

    def render(self, conversation: Conversation) -> str:
        return "\n\n".join(m["content"] for m in conversation if m["content"].strip())


@dataclass(frozen=True)
class ChatTemplate:
    """The tokenizer's own `chat_template` (e.g. SmolLM2's `<|im_start|>role ... <|im_end|>`)."""

    tokenizer: Any
    name: str = "chat_template"

    def render(self, conversation: Conversation) -> str:
        from jinja2 import TemplateError

        add_prompt = bool(conversation) and conversation[-1]["role"] == "user"
        try:
            return self.tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=add_prompt)
        except TemplateError as e:
            raise CalibrationError(f"--template chat_template: the tokenizer's chat template rejected a conversation ({e}); "
                                   "use --template solar or raw") from None


def get_template(name: str, tokenizer: Any = None) -> Template:
    """The template called `name`; `chat_template` needs the tokenizer that carries it."""
    if name == "solar":
        return SolarTemplate()
    if name == "raw":
        return RawTemplate()
    if name == "chat_template":
        if tokenizer is None:
            raise CalibrationError("--template chat_template needs the model's tokenizer")
        if not getattr(tokenizer, "chat_template", None):
            raise CalibrationError("--template chat_template: the model's tokenizer has no chat_template; "
                                   "use --template solar or raw")
        return ChatTemplate(tokenizer)
    raise CalibrationError(f"--template {name!r}: unknown template; choose one of {', '.join(TEMPLATE_NAMES)}")
