"""Automatic prefix caching on /v1 (the openai_chat inferlet's Context.use_prefix_cache / store_prefix over
the page pool's prefix cache), checked with the official `openai` client: a request whose prompt starts
with pages computed before computes only the rest and reports them as cached tokens; outputs are the same
with and without the cache, for concurrent requests that share prefixes and requests that do not."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

MODEL = "smollm2-135m"
WORDS = ["river", "ledger", "orbit", "granite", "signal", "harbor", "lantern", "meadow", "cipher", "falcon"]


def system_prompt(variant: int, lines: int) -> str:
    """A long, fixed system prompt (an agent's tool descriptions), one of several variants."""
    tools = [f"Tool {i} ({WORDS[(i + variant) % 10]}_{WORDS[(3 * i) % 10]}): returns the {WORDS[(i * 7) % 10]} "
             f"of a {WORDS[(i + 2 * variant) % 10]} given its {WORDS[(i * 3 + 1) % 10]} and a limit of {i * 13 % 97}."
             for i in range(lines)]
    return f"You are agent {variant}. You can call these tools:\n" + "\n".join(tools)


def chat(client, system: str, user: str, max_tokens: int = 6):
    return client.chat.completions.create(
        model=MODEL, temperature=0, max_tokens=max_tokens,
        messages=[{"role": "system", "content": system}, {"role": "user", "content": user}])


def test_a_second_request_with_the_same_long_system_prompt_computes_only_its_new_tokens(
        openai_client, server_runtime, pool_whole):
    system = system_prompt(0, 48)
    runner = server_runtime.runner
    before = runner.num_tokens_processed
    first = chat(openai_client, system, "Which tool finds a harbor?")
    computed_first = runner.num_tokens_processed - before
    assert first.usage.prompt_tokens > 1000
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert computed_first >= first.usage.prompt_tokens

    before = runner.num_tokens_processed
    second = chat(openai_client, system, "Which tool reads a ledger?")
    computed_second = runner.num_tokens_processed - before
    cached = second.usage.prompt_tokens_details.cached_tokens
    page = server_runtime.page_size
    # every full page of the shared part (the system message) came from the cache: at most the page the
    # user message starts in, and the user message's own pages, were computed
    assert cached % page == 0 and cached > first.usage.prompt_tokens - 64
    new_prompt_tokens = second.usage.prompt_tokens - cached
    assert new_prompt_tokens < 64
    assert computed_second <= new_prompt_tokens + second.usage.completion_tokens
    stats = pool_whole()
    assert stats["kv_pages"]["num_cached"] > 0


def test_outputs_are_the_same_with_and_without_the_cache_across_concurrent_requests(
        openai_client, server_config, server_runtime, tmp_path, pool_whole):
    import openai

    from pie.server import ServerThread

    systems = [system_prompt(v, 20) for v in (1, 2)]
    users = ["Which tool finds a falcon?", "Name one tool.", "What is tool 3 for?", "Which tool uses a cipher?"]
    requests = [(s, u) for s in systems for u in users] + [("Answer briefly.", u) for u in users[:2]]

    def run_all(client) -> list:
        with ThreadPoolExecutor(len(requests)) as pool:
            return list(pool.map(lambda r: chat(client, *r, max_tokens=8), requests))

    cfg = server_config.replace(openai={"prefix_caching": False})
    with ServerThread(cfg, runtime=server_runtime, programs_dir=tmp_path).start() as srv:
        plain_client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=300)
        plain = run_all(plain_client)
        plain_client.close()
    assert all(r.usage.prompt_tokens_details.cached_tokens == 0 for r in plain)
    cold = run_all(openai_client)   # concurrent: some may already find what others stored
    warm = run_all(openai_client)   # every shared prefix is in the cache now
    texts = [r.choices[0].message.content for r in plain]
    assert [r.choices[0].message.content for r in cold] == texts
    assert [r.choices[0].message.content for r in warm] == texts
    assert all(r.usage.prompt_tokens_details.cached_tokens > 0 for r in warm[:8])
    pool_whole()


def test_a_protocol_client_has_its_own_cache_and_cannot_read_another(server, openai_client):
    """Programs launched over the protocol use their client's own prefix cache (the SDK's Context adopts and
    files pages by itself): a second launch of the same client finds what the first computed; another
    client, and the /v1 routes' cache, are out of its sight (even for the exact prompt of a cached /v1
    request)."""
    from pie.client import Client

    system = system_prompt(3, 12)
    chat(openai_client, system, "Hello")
    chat(openai_client, system, "Hello again")  # in the /v1 cache now
    source = (
        "import inferlet\n"
        "ctx = inferlet.Context()\n"
        f"ctx.fill(inferlet.chat_prompt([{{'role': 'system', 'content': {system!r}}},"
        " {'role': 'user', 'content': 'Hello'}]))\n"
        "ctx.flush()\n"
        "inferlet.send('computed')\n")
    probe = (
        "import inferlet\n"
        "ctx = inferlet.Context()\n"
        f"ctx.fill(inferlet.chat_prompt([{{'role': 'system', 'content': {system!r}}},"
        " {'role': 'user', 'content': 'Hello'}]))\n"
        "inferlet.send(str(ctx.use_prefix_cache()))\n")
    with Client(server.ws_url) as client:
        digest = client.upload(probe.encode(), name="probe.py")
        first = client.run(program=digest, timeout=120)
        assert first.ok, first.error
        assert first.output == "0"  # the /v1 cache holds this prompt, but not for this client
        filler = client.run(program=client.upload(source.encode(), name="fill.py"), timeout=120)
        assert filler.ok, filler.error  # computed the prompt: the SDK filed its full pages
        again = client.run(program=digest, timeout=120)
        assert again.ok and int(again.output) > 100  # its own cache serves the prompt now
    with Client(server.ws_url) as other:
        fresh = other.run(program=other.upload(probe.encode(), name="probe.py"), timeout=120)
        assert fresh.ok and fresh.output == "0"  # another client sees none of it
