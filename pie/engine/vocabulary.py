"""How a tokenizer's tokens spell text: the vocabulary kind (byte-level, byte-fallback or raw) of a HF
tokenizer.json, and each token's text as bytes.

The bytes table is what a generation stream (csrc/control/generation_stream.h) searches for stop
strings: the text of a generation is the concatenation of its tokens' bytes (special tokens spell
nothing, as `decode(..., skip_special=True)` drops them), so a stop string is found by scanning only
the newest bytes, without decoding the whole text again at every token. The grammar host
(pie/runtime/grammar.py) gives llguidance the same table.

>>> table = token_bytes(model.tokenizer, model.runner.config.vocab_size)       # doctest: +SKIP
>>> b"".join(table[t] for t in ids).decode() == model.tokenizer.decode(ids)    # doctest: +SKIP
True
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pie.engine.tokenizer import Tokenizer

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def byte_level_alphabet() -> list[str]:
    """GPT-2 byte-level BPE alphabet: byte b is spelled by the character alphabet[b].

    Printable bytes ('!'..'~', 0xA1..0xAC, 0xAE..0xFF) stand for themselves; the other 68 bytes are
    shifted, in increasing order, to U+0100, U+0101, ... (so ' ' (0x20) is 'Ġ' (U+0120))."""
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    alphabet, shifted = [], 0
    for b in range(256):
        if b in printable:
            alphabet.append(chr(b))
        else:
            alphabet.append(chr(256 + shifted))
            shifted += 1
    return alphabet


def _component_types(node: Any, key: str) -> list[dict]:
    """The components of a tokenizer.json normalizer / pre-tokenizer / decoder, flattening the
    "Sequence" kind (its parts are listed under `key`)."""
    if not isinstance(node, dict):
        return []
    if node.get("type") == "Sequence":
        return [c for part in node.get(key) or [] for c in _component_types(part, key)]
    return [node]


def vocab_metadata(tokenizer_json: dict[str, Any]) -> tuple[str, bool]:
    """(vocab type, add_prefix_space) of a HF tokenizer.json, as xgrammar and llguidance name them.

    vocab type: "byte_level" (tokens spelled in the byte-level alphabet: GPT-2, Llama 3, SmolLM2,
    Qwen), "byte_fallback" (SentencePiece style: '▁' for a space, "<0xNN>" pieces for raw bytes:
    Llama 2, Mistral) or "raw" (tokens are their own text). add_prefix_space: whether tokenization
    puts a space in front of the text."""
    decoders = _component_types(tokenizer_json.get("decoder"), "decoders")
    pre = _component_types(tokenizer_json.get("pre_tokenizer"), "pretokenizers")
    normalizers = _component_types(tokenizer_json.get("normalizer"), "normalizers")
    decoder_kinds = {d.get("type") for d in decoders}
    pre_by_kind = {p.get("type"): p for p in pre}
    vocab = (tokenizer_json.get("model") or {}).get("vocab") or {}
    if "ByteLevel" in decoder_kinds or ("ByteLevel" in pre_by_kind and not decoder_kinds):
        return "byte_level", bool(pre_by_kind.get("ByteLevel", {}).get("add_prefix_space", False))
    byte_pieces = sum(f"<0x{b:02X}>" in vocab for b in range(256)) if isinstance(vocab, dict) else 0
    if "ByteFallback" in decoder_kinds or byte_pieces >= 128 or "Metaspace" in pre_by_kind:
        prefix = any(n.get("type") == "Prepend" and n.get("prepend") == "▁" for n in normalizers)
        meta = pre_by_kind.get("Metaspace")
        if meta is not None:
            scheme = meta.get("prepend_scheme")
            prefix = prefix or (scheme in ("always", "first") if scheme is not None
                                else bool(meta.get("add_prefix_space", False)))
        return "byte_fallback", prefix
    return "raw", False


def token_bytes(tokenizer: "Tokenizer", vocab_size: int) -> list[bytes]:
    """(vocab_size,) each token's text as UTF-8 bytes, by token id: b"" for special tokens and for ids the
    tokenizer lacks. Byte-level vocabularies map each spelling character back to its byte; byte-fallback
    ones (SentencePiece) read '▁' as a space and "<0xNN>" as that byte; raw ones are their own text.
    (A byte-fallback decoder drops the leading space of a text's first token; the table keeps it.)"""
    backend = tokenizer.backend
    kind, _ = vocab_metadata(json.loads(backend.to_str()))
    table = [b""] * vocab_size
    if kind == "byte_level":
        byte_of = {c: b for b, c in enumerate(byte_level_alphabet())}

        def spell(token: str) -> bytes:
            try:
                return bytes(byte_of[c] for c in token)
            except KeyError:  # not in the alphabet: the token is its own text
                return token.encode("utf-8")
    elif kind == "byte_fallback":
        def spell(token: str) -> bytes:
            piece = _BYTE_PIECE.fullmatch(token)
            if piece is not None:
                return bytes([int(piece.group(1), 16)])
            return token.replace("\u2581", " ").encode("utf-8")
    else:
        def spell(token: str) -> bytes:
            return token.encode("utf-8")
    for token, idx in backend.get_vocab(with_added_tokens=False).items():
        if 0 <= idx < vocab_size:
            table[idx] = spell(token)
    for idx, added in backend.get_added_tokens_decoder().items():
        if 0 <= idx < vocab_size:
            table[idx] = b"" if added.special else added.content.encode("utf-8")
    return table
