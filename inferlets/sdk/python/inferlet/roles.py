"""Role blocks: a Context written as a conversation, message by message, through the model's chat template.

    ctx.system("Be brief.")
    ctx.user("What is the capital of France?")
    with ctx.assistant():
        ctx.gen("answer", max_tokens=16)

Each message is filled as the template renders it after the ones before: its header (e.g.
"<|im_start|>user\\n"), its content and its closing (e.g. "<|im_end|>\\n"), so that a conversation written
this way holds the tokens of `chat_prompt(messages)` (the template splits messages at special tokens). An
assistant block opens with the template's generation prompt; what is generated or filled inside it becomes
the message's content, and the closing is filled when the block ends (at `with`'s end, or when the next
message starts). Without a chat template, messages are their contents joined by blank lines (as
`Context.fill_chat`), and an assistant block adds nothing around its content.
"""

from __future__ import annotations

from typing import Callable, Optional

import inferlet

_SENTINEL = "\x00pie-content\x00"  # a content no template changes, to find where a message's content goes


class RoleBlock:
    """An open message of a Context; `with` closes it at the block's end (closing twice is harmless)."""

    def __init__(self, ctx: "RoleBlocks"):
        self.ctx = ctx

    def __enter__(self) -> "RoleBlock":
        return self

    def __exit__(self, *exc) -> None:
        self.ctx.close_role()


class RoleBlocks:
    """The role methods of `inferlet.Context` (a mixin; the state lives on the Context).

    State: `messages` ({"role", "content"} of the closed messages, in order); `_rendered`: the chat text
    whose tokens the role methods filled (closed messages and the open one's header); `_open`: (role,
    index in `tokens` where its content starts) of the open message, or None."""

    messages: list[dict]
    _rendered: str
    _render: Callable[[list[dict], bool], str]  # the chat template, with the context's tools (tools.py)
    _open: Optional[tuple[str, int]]

    def system(self, content: Optional[str] = None) -> RoleBlock:
        """A system message: filled whole when `content` is given, else opened as a block.

        >>> ctx.system("You are a terse assistant.")
        """
        return self.role("system", content)

    def user(self, content: Optional[str] = None) -> RoleBlock:
        """A user message (filled whole, or a block without `content`).

        >>> ctx.user("Name three colors.")
        """
        return self.role("user", content)

    def assistant(self, content: Optional[str] = None) -> RoleBlock:
        """The assistant's turn: opens with the template's generation prompt; without `content`, what is
        generated next is its content until the block closes.

        >>> with ctx.assistant():
        ...     ctx.gen("colors", max_tokens=24)
        """
        return self.role("assistant", content)

    def role(self, name: str, content: Optional[str] = None) -> RoleBlock:
        """A message of role `name`; the open message (if any) is closed first."""
        self.close_role()
        header, closing = self._frame(name)
        if content is not None:
            self._fill_rendered(header + content + closing)
            self.messages.append({"role": name, "content": content})
        else:
            self._fill_rendered(header)
            self._open = (name, len(self.tokens))
        return RoleBlock(self)

    def close_role(self) -> None:
        """Ends the open message: its content is the text filled or generated since it opened."""
        if self._open is None:
            return
        name, start = self._open
        self._open = None
        content = inferlet.decode(self.tokens[start:])
        self._rendered += content
        self._fill_rendered(self._frame(name)[1])
        self.messages.append({"role": name, "content": content})

    def _fill_rendered(self, text: str) -> None:
        if text:
            self.fill(text)
            self._rendered += text

    def _frame(self, name: str) -> tuple[str, str]:
        """(header, closing): the text the template puts before and after a message of role `name` that
        follows `messages`."""
        if not inferlet.model_facts().has_chat_template:
            return ("\n\n" if self.tokens and name != "assistant" else ""), ""
        probe = self._render(self.messages + [{"role": name, "content": _SENTINEL}], False)
        at = probe.index(_SENTINEL)
        closing = probe[at + len(_SENTINEL):]
        if name == "assistant":  # the generation prompt, as chat_prompt(messages) ends
            return _after(self._render(self.messages, True), self._rendered), closing
        return _after(probe[:at], self._rendered), closing


def _after(text: str, prefix: str) -> str:
    """What `text` adds to `prefix` (from where they first differ, should a template not extend its
    earlier rendering)."""
    n = 0
    while n < min(len(text), len(prefix)) and text[n] == prefix[n]:
        n += 1
    return text[n:]
