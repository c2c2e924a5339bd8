"""Many instances at once: each on its own thread, their forward passes batched together; outputs stay
correct and every page returns to the pool."""

PROMPTS = ["What is the capital of France?", "Name a color.", "What is 2 plus 2?", "Say hello."]


def test_concurrent_text_completions(runtime, model):
    from pie.control.generate import GenerationParams, generate

    expected = {p: generate(model, p, GenerationParams(max_tokens=12, temperature=0)).text + "\n" for p in PROMPTS}
    batches_before = runtime.num_batches
    commands_before = runtime.num_commands
    instances = [runtime.launch("text_completion", ["--prompt", p, "--max-tokens", "12", "--temperature", "0"])
                 for p in PROMPTS * 3]
    results = [i.wait(120) for i in instances]
    for p, r in zip(PROMPTS * 3, results):
        assert r.error is None, r.error
        assert r.output == expected[p]
    assert runtime.num_free_pages == runtime.num_pages
    assert len({r.instance_id for r in results}) == len(results)
    # batched: fewer forward passes than commands
    assert runtime.num_batches - batches_before < runtime.num_commands - commands_before


def test_100_concurrent_text_completions_and_the_pool_back_to_zero(runtime, model):
    from pie.control.generate import GenerationParams, generate

    expected = {p: generate(model, p, GenerationParams(max_tokens=6, temperature=0)).text + "\n" for p in PROMPTS}
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(100)]
    instances = [runtime.launch("text_completion", ["--prompt", p, "--max-tokens", "6", "--temperature", "0"])
                 for p in prompts]
    results = [i.wait(300) for i in instances]
    wrong = [(k, r.error or r.output) for k, (p, r) in enumerate(zip(prompts, results))
             if r.error is not None or r.output != expected[p]]
    assert wrong == []
    assert runtime.num_free_pages == runtime.num_pages
