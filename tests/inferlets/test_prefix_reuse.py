"""prefix_cache (a system prompt exported by one instance, imported by later ones) and prefix_tree (nested
shared prefixes of many prompts inside one instance): shared tokens are computed once, and the outputs are
those of plain text_completion."""

import uuid

import pytest


@pytest.fixture
def system():
    """A system prompt of this test alone (its export's name derives from its tokens)."""
    return f"You are a terse assistant (session {uuid.uuid4().hex[:8]}). Answer in one short sentence."


def test_prefix_cache_second_launch_computes_only_the_suffix(runtime, measure, chat_tokens, completion, system):
    max_tokens = 10
    prefix = chat_tokens(system, None, add_generation_prompt=False)
    whole = chat_tokens(system, "Name a planet.")
    assert whole[:len(prefix)] == prefix
    prefix_pages = -(-len(prefix) // runtime.page_size)
    args = ["--system", system, "--max-tokens", max_tokens, "--temperature", 0, "--json"]
    pool0 = runtime.plane.kv_pages.stats()
    exports0 = set(runtime.plane.kv_pages.export_names())
    try:
        first = measure("prefix_cache", *args, "--prompt", "Name a planet.")
        a = first.json()
        assert not a["imported"] and a["prefix_tokens"] == len(prefix) and a["prompt_tokens"] == len(whole)
        assert a["computed_prompt_tokens"] == len(whole)
        # the export outlives the instance: its pages stay out of the pool, one export more
        pool1 = runtime.plane.kv_pages.stats()
        assert pool1["num_exports"] == pool0["num_exports"] + 1
        assert pool1["num_exported"] == pool0["num_exported"] + prefix_pages
        assert pool1["num_free"] == pool0["num_free"] - prefix_pages
        assert a["name"] in runtime.plane.kv_pages.export_names()

        second = measure("prefix_cache", *args, "--prompt", "Name a planet.")
        b = second.json()
        assert b["imported"] and b["name"] == a["name"]
        assert b["computed_prompt_tokens"] == len(whole) - len(prefix)
        # the engine computed the prefix for the first launch only; the generations are the same
        assert b["text"] == a["text"] == completion("Name a planet.", max_tokens, "--system", system)
        assert second.tokens == first.tokens - len(prefix)
        assert runtime.plane.kv_pages.stats()["num_free"] == pool1["num_free"]  # nothing leaked by the importer

        # another prompt with the same system prompt: imports it too
        other = measure("prefix_cache", *args, "--prompt", "Name a color.")
        c = other.json()
        assert c["imported"] and c["computed_prompt_tokens"] == len(chat_tokens(system, "Name a color.")) - len(prefix)
        assert c["text"] == completion("Name a color.", max_tokens, "--system", system)

        dropped = measure("prefix_cache", "--system", system, "--drop")
        assert dropped.output == f"dropped {a['name']}\n"
        assert runtime.plane.kv_pages.stats() == pool0
    finally:  # whatever failed, leave no export of this test behind
        for name in set(runtime.plane.kv_pages.export_names()) - exports0:
            runtime.plane.kv_pages.unexport(name)


@pytest.mark.parametrize("shared", [False, True])
def test_prefix_cache_is_one_clients_unless_shared(runtime, measure, system, shared):
    """Two clients (two connections of a server): without --shared each computes and keeps its own prefix;
    with it the second imports the first's. Ending the clients leaves nothing but an ownerless shared one."""
    alice, bob = 101, 102
    args = ["--system", system, "--prompt", "Name a planet.", "--max-tokens", 4, "--temperature", 0, "--json"]
    args += ["--shared"] if shared else []
    exports0 = runtime.plane.kv_pages.stats()["num_exports"]
    try:
        first = measure("prefix_cache", *args, client=alice).json()
        again = measure("prefix_cache", *args, client=alice).json()
        other = measure("prefix_cache", *args, client=bob).json()
        assert not first["imported"] and again["imported"]
        assert other["imported"] == shared and other["text"] == first["text"]
        assert runtime.plane.kv_pages.stats()["num_exports"] == exports0 + (1 if shared else 2)
    finally:
        runtime.end_client(alice)
        runtime.end_client(bob)
    left = [e for e in runtime.plane.kv_pages.stats()["exports"] if e["name"] == first["name"]]
    assert [(e["shared"], e["ownerless"]) for e in left] == ([(True, True)] if shared else [])
    if shared:
        runtime.plane.kv_pages.unexport(first["name"])
    assert runtime.plane.kv_pages.stats()["num_exports"] == exports0


def test_prefix_tree_computes_each_shared_prefix_once(runtime, measure, chat_tokens, completion):
    system = "Answer briefly."
    prompts = ["Alice has 3 apples and 2 pears. How many apples?",
               "Alice has 3 apples and 2 pears. How many pears?",
               "Alice has 3 apples and a dog. What pet does she have?"]
    max_tokens = 6
    seqs = [chat_tokens(system, p) for p in prompts]
    # The distinct prefixes of all prompts: what a trie holds, each computed once.
    distinct = len({tuple(s[:i]) for s in seqs for i in range(1, len(s) + 1)})
    assert distinct < sum(map(len, seqs))
    r = measure("prefix_tree", "--system", system, *[a for p in prompts for a in ("--prompt", p)],
                "--max-tokens", max_tokens, "--temperature", 0, "--ignore-eos", "--json")
    result = r.json()
    assert result["prompt_tokens"] == [len(s) for s in seqs]
    assert result["trie_tokens"] == distinct
    # a nested trie: the root, a branch shared by the first two prompts, then one leaf per prompt
    trie = result["trie"]
    assert [n["parent"] for n in trie].count(None) == 1
    assert sorted(i for n in trie for i in n["ends"]) == [0, 1, 2]
    assert max(depth(trie, i) for i in range(len(trie))) == 2
    assert r.tokens == distinct + len(prompts) * (max_tokens - 1) == result["computed"]
    # independent completions would have computed every prompt whole
    assert result["computed_unshared"] == sum(map(len, seqs)) + len(prompts) * (max_tokens - 1) > r.tokens
    for p, text in zip(prompts, result["texts"]):
        assert text == completion(p, max_tokens, "--system", system, "--ignore-eos")


def depth(trie, i):
    d = 0
    while trie[i]["parent"] is not None:
        i, d = trie[i]["parent"], d + 1
    return d
