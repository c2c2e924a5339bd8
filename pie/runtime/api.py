"""The host side of the WIT package `pie:inferlet`: which function is implemented where.

Every function of every interface in `inferlets/wit/inferlet.wit` is defined on the linker:
- hot calls (forward, kv allocate / free / fork / copy-tokens / mask-page, page size, instance id) are C++
  (csrc/runtime/host_calls.cpp): no GIL, no Python;
- cold calls are the Python functions below, registered through the same C API shim (`register_cold`);
- the rest trap with "not implemented yet: <interface>.<function>".
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Callable

from pie._ext import _runtime
from pie.runtime.generation import GENERATION_COLD
from pie.runtime.grammar import GRAMMAR_COLD
from pie.runtime.http_fetch import http_fetch
from pie.runtime.paths import wit_dir

if TYPE_CHECKING:
    from pie.runtime.instance import Instance

PACKAGE = "pie:inferlet"
VERSION = "0.1.0"


@lru_cache(maxsize=None)
def wit_functions() -> dict[str, tuple[str, ...]]:
    """interface -> its function names, parsed from the WIT (the contract is the file)."""
    text = (wit_dir() / "inferlet.wit").read_text()
    out: dict[str, tuple[str, ...]] = {}
    for m in re.finditer(r"^interface ([a-z0-9-]+) \{(.*?)^\}", text, re.S | re.M):
        names = re.findall(r"^\s+([a-z0-9-]+): func\(", m.group(2), re.M)
        if names:
            out[m.group(1)] = tuple(names)
    return out


# ---- cold calls: f(instance, *args) -> value ----------------------------------------------------------

def _check_token_ids(inst: "Instance", ids: list[int], arg: str) -> None:
    vocab = inst.services.model.vocab_size
    for i, t in enumerate(ids):
        if not 0 <= t < vocab:
            raise ValueError(f"{arg}[{i}]: token id {t} is outside the vocabulary [0, {vocab})")


def runtime_version(inst: "Instance") -> str:
    return VERSION


def runtime_arguments(inst: "Instance") -> list[str]:
    return list(inst.arguments)


def runtime_send(inst: "Instance", message: str) -> None:
    inst.emit(message)


def runtime_receive(inst: "Instance") -> str:
    return inst.receive()


def runtime_log(inst: "Instance", message: str) -> None:
    inst.add_log(message)


def runtime_set_return(inst: "Instance", value: str) -> None:
    inst.return_value = value


def kv_num_free_pages(inst: "Instance") -> int:
    return inst.services.num_free_pages


def _kv_pool(inst: "Instance") -> Any:
    return inst.services.plane.kv_pages


MAX_EXPORT_NAME = 1024  # bytes of an export's name (names are kept by the pool for as long as the export)


def kv_export_pages(inst: "Instance", name: str, pages: list[int], options: tuple[bool, bool]) -> None:
    """options: (persistent, shared). The export is in this instance's client's scope unless shared."""
    from pie.control import InvalidHandle

    persistent, shared = options
    if not name:
        raise ValueError("name: an export needs a non-empty name")
    if len(name.encode("utf-8", "surrogatepass")) > MAX_EXPORT_NAME:
        raise ValueError(f"name: an export name is at most {MAX_EXPORT_NAME} bytes (UTF-8)")
    try:
        _kv_pool(inst).export_pages(inst.id, name, pages, persistent=persistent, shared=shared)
    except InvalidHandle as e:
        raise ValueError(f"pages: {_pool_message(e)}") from None
    except ValueError as e:
        raise ValueError(f"name: {_pool_message(e)}") from None


def kv_import_pages(inst: "Instance", name: str) -> list[int] | None:
    from pie.control import InvalidHandle

    try:
        return _kv_pool(inst).import_pages(inst.id, name)
    except InvalidHandle:  # no export of that name in this client's view
        return None


MAX_CACHE_KEYS = 65536  # keys of one cache-lookup / cache-store (a 1M-token sequence of 16-token pages)
MAX_CACHE_KEY = 128  # bytes of a prefix cache key (the SDK's are 32 hex digits)


def _check_cache_keys(keys: list[str]) -> None:
    if len(keys) > MAX_CACHE_KEYS:
        raise ValueError(f"keys: at most {MAX_CACHE_KEYS} in one call, got {len(keys)}")
    for i, key in enumerate(keys):
        if not key or len(key.encode("utf-8", "surrogatepass")) > MAX_CACHE_KEY:
            raise ValueError(f"keys[{i}]: a prefix cache key has 1 to {MAX_CACHE_KEY} bytes")


def kv_cache_lookup(inst: "Instance", keys: list[str]) -> list[int]:
    _check_cache_keys(keys)
    return _kv_pool(inst).cache_lookup(inst.id, keys)


def kv_cache_store(inst: "Instance", keys: list[str], pages: list[int]) -> int:
    from pie.control import InvalidHandle

    _check_cache_keys(keys)
    if len(keys) != len(pages):
        raise ValueError(f"pages: {len(pages)} pages for {len(keys)} keys")
    try:
        return _kv_pool(inst).cache_store(inst.id, keys, pages)
    except InvalidHandle as e:
        raise ValueError(f"pages: {_pool_message(e)}") from None


def kv_unexport_pages(inst: "Instance", name: str) -> None:
    from pie.control import InvalidHandle

    try:
        _kv_pool(inst).unexport(name, inst.id)  # the pool knows the instance's client
    except InvalidHandle as e:
        raise ValueError(f"name: {_pool_message(e)}") from None


def kv_list_exports(inst: "Instance") -> list[str]:
    return _kv_pool(inst).export_names(inst.id)  # sorted, this client's and the shared ones


def _pool_message(e: BaseException) -> str:
    """The pool's message without its "instance N: " prefix (the trap names the call already)."""
    return re.sub(r"^instance \d+: ", "", str(e))


def _embed_pool(inst: "Instance") -> Any:
    pool = inst.services.plane.embed_slots
    if pool is None:
        raise RuntimeError("input embeddings need embedding slots (EngineConfig.embedding_slots)")
    return pool


def embeddings_allocate(inst: "Instance", count: int) -> list[int]:
    pool = _embed_pool(inst)
    if count > pool.num_pages:
        raise ValueError(f"count: {count} slots requested, more than the pool's {pool.num_pages}")
    return pool.allocate(inst.id, count)


def embeddings_free(inst: "Instance", slots: list[int]) -> None:
    from pie.control import InvalidHandle

    try:
        _embed_pool(inst).free(inst.id, slots)
    except InvalidHandle as e:
        raise ValueError(f"slots: {_pool_message(e)}") from None


def embeddings_embed_tokens(inst: "Instance", slots: list[int], tokens: list[int]) -> None:
    from pie.control import InvalidHandle

    if len(slots) != len(tokens):
        raise ValueError(f"tokens: {len(tokens)} tokens for {len(slots)} slots")
    _check_token_ids(inst, tokens, "tokens")
    try:
        physical = _embed_pool(inst).resolve(inst.id, slots)
    except InvalidHandle as e:
        raise ValueError(f"slots: {_pool_message(e)}") from None
    inst.services.embeddings.write(physical, inst.services.embed_tokens(tokens))


def embeddings_embed_text(inst: "Instance", slots: list[int], text: str) -> list[int]:
    tokens = inst.services.tokenizer.encode(text, add_bos=False)
    if len(tokens) != len(slots):
        raise ValueError(f"text: it has {len(tokens)} tokens, not one per slot ({len(slots)} slots)")
    embeddings_embed_tokens(inst, slots, tokens)
    return tokens


def _control_queue(inst: "Instance", q: int) -> Any:
    """The pie.control CommandQueue behind handle q (0 = the default queue)."""
    if q == 0:
        return inst.state.default_queue
    queue = inst.queues.get(q)
    if queue is None:
        raise ValueError(f"q: {q} is not a queue of this instance")
    return queue


def _priority(name: str) -> Any:
    from pie.control import Priority

    return {"low": Priority.LOW, "normal": Priority.NORMAL, "high": Priority.HIGH}[name]


def queues_create(inst: "Instance", priority: str) -> int:
    queue = inst.services.plane.create_queue(inst.id, _priority(priority))
    handle = inst.next_queue_handle
    inst.next_queue_handle += 1
    inst.state.add_queue(handle, queue)
    inst.queues[handle] = queue
    return handle


def queues_set_priority(inst: "Instance", q: int, priority: str) -> None:
    _control_queue(inst, q).priority = _priority(priority)


def queues_synchronize(inst: "Instance", q: int) -> None:
    """Blocks (GIL released inside Future.result) until everything queued on q so far has run."""
    left = inst.state.seconds_left
    try:
        _control_queue(inst, q).synchronize().result(timeout=None if left < 0 else max(left, 0.0))
    except TimeoutError:
        raise TimeoutError("the instance's deadline passed while synchronizing") from None


def queues_destroy(inst: "Instance", q: int) -> None:
    if q == 0:
        raise ValueError("q: the default queue 0 cannot be destroyed")
    queue = _control_queue(inst, q)
    inst.state.remove_queue(q)
    del inst.queues[q]
    queue.close("destroyed by its instance")


def kv_store_get(inst: "Instance", key: str) -> str | None:
    return inst.services.kv_store.get(key, inst.client)


def kv_store_set(inst: "Instance", key: str, value: str) -> None:
    inst.services.kv_store.set(key, value, inst.client)


def kv_store_delete(inst: "Instance", key: str) -> bool:
    return inst.services.kv_store.delete(key, inst.client)


def kv_store_list_keys(inst: "Instance", prefix: str) -> list[str]:
    return inst.services.kv_store.list_keys(prefix, inst.client)


def messaging_broadcast(inst: "Instance", topic: str, message: str) -> None:
    inst.services.broker.broadcast(topic, message, inst.client)


def messaging_subscribe(inst: "Instance", topic: str) -> int:
    return inst.services.broker.subscribe(inst.id, topic, inst.client)


def messaging_receive(inst: "Instance", handle: int) -> str:
    return inst.services.broker.receive(inst, handle)


def messaging_unsubscribe(inst: "Instance", handle: int) -> None:
    inst.services.broker.unsubscribe(inst.id, handle)


def models_list_models(inst: "Instance") -> list[str]:
    return [inst.services.model.name]


def models_list_adapters(inst: "Instance") -> list[str]:
    return list(inst.services.model.adapters)


def models_adapter(inst: "Instance", name: str) -> int | None:
    names = inst.services.model.adapters
    return names.index(name) + 1 if name in names else None


def models_info(inst: "Instance") -> tuple:
    m = inst.services.model
    return (m.name, m.architecture, m.vocab_size, m.num_layers, m.page_size, m.max_batch_tokens)


def tokenizer_encode(inst: "Instance", text: str, add_bos: bool) -> list[int]:
    return inst.services.tokenizer.encode(text, add_bos=add_bos)


def tokenizer_decode(inst: "Instance", tokens: list[int], skip_special: bool) -> str:
    _check_token_ids(inst, tokens, "tokens")
    return inst.services.tokenizer.decode(tokens, skip_special_tokens=skip_special)


def tokenizer_vocab_size(inst: "Instance") -> int:
    return inst.services.model.vocab_size


def tokenizer_special_tokens(inst: "Instance") -> tuple:
    special = inst.services.tokenizer.special
    return (special.bos_id, bool(special.add_bos), sorted(inst.services.eos_ids), getattr(special, "pad_id", None))


def tokenizer_token_to_id(inst: "Instance", token: str) -> int | None:
    return inst.services.tokenizer.token_to_id(token)


def tokenizer_id_to_token(inst: "Instance", token_id: int) -> str | None:
    _check_token_ids(inst, [token_id], "id")
    return inst.services.tokenizer.id_to_token(token_id)


def tokenizer_chat_template(inst: "Instance") -> str | None:
    template = inst.services.tokenizer.chat_template
    return None if template is None else template.source


def tokenizer_apply_chat_template(inst: "Instance", messages: list[tuple[str, str]], add_generation_prompt: bool) -> str:
    if inst.services.tokenizer.chat_template is None:
        raise ValueError(f"the model {inst.services.model.name} has no chat template")
    return inst.services.tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in messages],
                                                      add_generation_prompt=add_generation_prompt)


def tokenizer_apply_chat_template_json(inst: "Instance", messages: str, tools: str, add_generation_prompt: bool) -> str:
    import json

    template = inst.services.tokenizer.chat_template
    if template is None:
        raise ValueError(f"the model {inst.services.model.name} has no chat template")
    try:
        parsed = json.loads(messages)
        tool_list = json.loads(tools) if tools else None
    except ValueError as e:
        raise ValueError(f"messages / tools: not JSON: {e}") from None
    if not isinstance(parsed, list) or not all(isinstance(m, dict) for m in parsed):
        raise ValueError("messages: a JSON array of objects")
    if tool_list is not None and not isinstance(tool_list, list):
        raise ValueError("tools: a JSON array")
    extra = {"tools": tool_list} if tool_list is not None else {}
    return template.render(parsed, add_generation_prompt=add_generation_prompt, **extra)


_U32_LIST = ("list", "u32")
HTTP_RESPONSE = ("record", (("status", "u16"), ("headers", ("list", ("tuple", ("string", "string")))),
                            ("body", ("list", "u8"))))
MODEL_INFO = ("record", (("name", "string"), ("architecture", "string"), ("vocab-size", "u32"),
                         ("num-layers", "u32"), ("page-size", "u32"), ("max-batch-tokens", "u32")))
SPECIAL_TOKEN_IDS = ("record", (("bos", ("option", "u32")), ("add-bos", "bool"), ("eos", _U32_LIST),
                                ("pad", ("option", "u32"))))

# (interface, function) -> (implementation, result type descriptor or None)
COLD: dict[tuple[str, str], tuple[Callable[..., Any], Any]] = {
    ("runtime", "version"): (runtime_version, "string"),
    ("runtime", "arguments"): (runtime_arguments, ("list", "string")),
    ("runtime", "send"): (runtime_send, None),
    ("runtime", "receive"): (runtime_receive, "string"),
    ("runtime", "log"): (runtime_log, None),
    ("runtime", "set-return"): (runtime_set_return, None),
    ("models", "list-models"): (models_list_models, ("list", "string")),
    ("models", "info"): (models_info, MODEL_INFO),
    ("models", "list-adapters"): (models_list_adapters, ("list", "string")),
    ("models", "adapter"): (models_adapter, ("option", "u32")),
    ("kv", "num-free-pages"): (kv_num_free_pages, "u32"),
    ("kv", "export-pages"): (kv_export_pages, None),
    ("kv", "import-pages"): (kv_import_pages, ("option", _U32_LIST)),
    ("kv", "unexport-pages"): (kv_unexport_pages, None),
    ("kv", "list-exports"): (kv_list_exports, ("list", "string")),
    ("kv", "cache-lookup"): (kv_cache_lookup, _U32_LIST),
    ("kv", "cache-store"): (kv_cache_store, "u32"),
    ("embeddings", "allocate"): (embeddings_allocate, _U32_LIST),
    ("embeddings", "free"): (embeddings_free, None),
    ("embeddings", "embed-tokens"): (embeddings_embed_tokens, None),
    ("embeddings", "embed-text"): (embeddings_embed_text, _U32_LIST),
    ("queues", "create"): (queues_create, "u32"),
    ("queues", "set-priority"): (queues_set_priority, None),
    ("queues", "synchronize"): (queues_synchronize, None),
    ("queues", "destroy"): (queues_destroy, None),
    ("kv-store", "get"): (kv_store_get, ("option", "string")),
    ("kv-store", "set"): (kv_store_set, None),
    ("kv-store", "delete"): (kv_store_delete, "bool"),
    ("kv-store", "list-keys"): (kv_store_list_keys, ("list", "string")),
    ("messaging", "broadcast"): (messaging_broadcast, None),
    ("messaging", "subscribe"): (messaging_subscribe, "u32"),
    ("messaging", "receive"): (messaging_receive, "string"),
    ("messaging", "unsubscribe"): (messaging_unsubscribe, None),
    ("tokenizer", "encode"): (tokenizer_encode, _U32_LIST),
    ("tokenizer", "decode"): (tokenizer_decode, "string"),
    ("tokenizer", "apply-chat-template-json"): (tokenizer_apply_chat_template_json, "string"),
    ("tokenizer", "vocab-size"): (tokenizer_vocab_size, "u32"),
    ("tokenizer", "special-tokens"): (tokenizer_special_tokens, SPECIAL_TOKEN_IDS),
    ("tokenizer", "token-to-id"): (tokenizer_token_to_id, ("option", "u32")),
    ("tokenizer", "id-to-token"): (tokenizer_id_to_token, ("option", "string")),
    ("tokenizer", "chat-template"): (tokenizer_chat_template, ("option", "string")),
    ("tokenizer", "apply-chat-template"): (tokenizer_apply_chat_template, "string"),
    ("http", "fetch"): (http_fetch, ("result", HTTP_RESPONSE, "string")),
}


COLD.update(GRAMMAR_COLD)  # grammar.* (llguidance): pie/runtime/grammar.py
COLD.update(GENERATION_COLD)  # generation.* (streams run by the control layer): pie/runtime/generation.py


def implementation(iface: str, name: str) -> str:
    """"hot" (C++), "cold" (Python) or "missing" (traps: not implemented yet)."""
    if _runtime.is_hot(iface, name):
        return "hot"
    return "cold" if (iface, name) in COLD else "missing"


def define_all(linker: Any) -> None:
    """Defines every WIT function of the package on a wasmtime component linker."""
    import ctypes

    with linker.root() as root:
        for iface, names in wit_functions().items():
            with root.add_instance(f"{PACKAGE}/{iface}@{VERSION}") as li:
                ptr = ctypes.cast(li.ptr(), ctypes.c_void_p).value
                for name in names:
                    kind = implementation(iface, name)
                    if kind == "hot":
                        _runtime.register_hot(ptr, iface, name)
                    elif kind == "cold":
                        func, result = COLD[(iface, name)]
                        _runtime.register_cold(ptr, name, f"{iface}.{name}", func, result)
                    else:
                        _runtime.register_unimplemented(ptr, name, f"{iface}.{name}")
