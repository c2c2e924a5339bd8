"""tree_of_thought, graph_of_thought, skeleton_of_thought and recursion_of_thought: their structure, and that
no shared prefix is ever computed twice.

Each inferlet reports (--json) every context it used: the parent it was forked from, how many tokens' K/V
it inherited by the fork, the tokens it added itself, the ones it ran and dropped again (scoring
questions) and the ones still pending at the end. The engine's own count of computed tokens must equal the
sum of what the contexts added: every shared prefix computed once."""

import re

import pytest


def decode(runtime, tokens):
    return runtime.tokenizer.decode(tokens, skip_special_tokens=False)


def check_trace(result, engine_tokens):
    """Each context computed only its own tokens: the engine's count is the sum of the tokens the contexts
    added (run, or run and dropped again, but not left pending), and a fork inherits a prefix its
    parent had computed."""
    ctxs = result["contexts"]
    assert ctxs[0]["parent"] is None and ctxs[0]["inherited"] == 0
    assert all(c["parent"] is not None for c in ctxs[1:])
    added = sum(len(c["tokens"]) + c["discarded"] - c["pending"] for c in ctxs)
    assert engine_tokens == added == result["computed"] == sum(c["computed"] for c in ctxs)
    for c in ctxs[1:]:
        parent = ctxs[c["parent"]]
        assert parent["inherited"] < c["inherited"] <= parent["inherited"] + len(parent["tokens"])
        # a fork does not run again a token its parent had at that position (same prefix, same K/V)
        at = c["inherited"] - parent["inherited"]
        if c["tokens"] and at < len(parent["tokens"]):
            assert c["tokens"][0] != parent["tokens"][at]
    # Without the forks every context would have computed its inherited prefix again.
    inherited = sum(c["inherited"] for c in ctxs)
    assert inherited > 0 and result["computed_unshared"] == engine_tokens + inherited


def full_length(ctx):
    return ctx["inherited"] + len(ctx["tokens"])


def test_tree_of_thought_expands_the_best_scored_step(runtime, measure):
    problem = "How can I get from Paris to Rome cheaply?"
    r = measure("tree_of_thought", "--problem", problem, "--breadth", 2, "--depth", 2, "--step-tokens", 8,
                "--answer-tokens", 8, "--seed", 3, "--json")
    result = r.json()
    check_trace(result, r.tokens)
    ctxs = result["contexts"]
    assert problem in decode(runtime, ctxs[0]["tokens"])
    assert len(ctxs) == 1 + 2 + 2  # the prompt, two steps per level

    levels = result["levels"]
    assert [len(level) for level in levels] == [2, 2]
    kept_nodes = []
    for depth, level in enumerate(levels):
        assert all(0.0 < e["score"] < 1.0 for e in level)
        kept = [i for i, e in enumerate(level) if e["kept"]]
        assert len(kept) == 1 and level[kept[0]]["score"] == max(e["score"] for e in level)
        # steps are trace nodes 1-2 (level 1) and 3-4 (level 2); each level's parent is the kept node before
        assert all(e["parent"] == (0 if depth == 0 else kept_nodes[-1]) for e in level)
        kept_nodes.append(1 + 2 * depth + kept[0])
    assert result["path"] == [levels[d][n - 1 - 2 * d]["step"] for d, n in enumerate(kept_nodes)]

    for i, c in enumerate(ctxs[1:], 1):
        parent = ctxs[c["parent"]]
        # a step shares its parent's whole sequence (prompt, earlier steps, the "Step d:" header) ...
        assert c["inherited"] == full_length(parent)
        # ... and scoring it ran a question that was dropped again
        assert c["discarded"] > 0 and c["discarded"] == ctxs[1]["discarded"]
        step = levels[(i - 1) // 2][(i - 1) % 2]["step"]
        assert step in decode(runtime, c["tokens"])
    assert result["answer"] in decode(runtime, ctxs[kept_nodes[-1]]["tokens"])


def test_graph_of_thought_merges_the_drafts_into_a_fork_of_the_best(runtime, measure):
    r = measure("graph_of_thought", "--problem", "Give one tip for learning a language.", "--drafts", 3,
                "--draft-tokens", 8, "--answer-tokens", 8, "--seed", 2, "--json")
    result = r.json()
    check_trace(result, r.tokens)
    ctxs = result["contexts"]
    drafts, order = result["drafts"], result["merged_from"]
    assert [c["name"] for c in ctxs] == ["prompt", "draft", "draft", "draft", "merged"]
    assert sorted(order) == [0, 1, 2] and all(d["merged"] for d in drafts)
    assert [drafts[i]["score"] for i in order] == sorted((d["score"] for d in drafts), reverse=True)
    for i, d in enumerate(drafts, 1):
        assert ctxs[i]["inherited"] == len(ctxs[0]["tokens"]) == result["prompt_tokens"]
        assert d["text"] in decode(runtime, ctxs[i]["tokens"])

    merged = ctxs[4]
    best = ctxs[1 + order[0]]
    # the merged node is a fork of the best draft (the prompt and that draft shared), with edges from all
    assert merged["parent"] == 1 + order[0] and merged["parents"] == [1 + i for i in order]
    assert merged["inherited"] == full_length(best)
    text = decode(runtime, merged["tokens"])
    for i in order[1:]:
        assert drafts[i]["text"] in text  # the other drafts, aggregated as text
    assert drafts[order[0]]["text"] not in text  # the best one is inherited, not refilled
    assert result["answer"] in text.split("Combined answer:")[1]


def test_skeleton_of_thought_expands_every_point_in_a_fork_of_the_skeleton(runtime, measure):
    question = "How do I start running?"
    args = ["--question", question, "--points", 3, "--skeleton-tokens", 8, "--point-tokens", 8]
    r = measure("skeleton_of_thought", *args, "--json")
    result = r.json()
    check_trace(result, r.tokens)
    ctxs = result["contexts"]
    points, expansions = result["skeleton"], result["expansions"]
    assert len(points) == len(expansions) == 3 and all(points)
    skeleton = decode(runtime, ctxs[0]["tokens"])
    assert "".join(f"{i}. {p}\n" for i, p in enumerate(points, 1)) in skeleton
    assert len(ctxs) == 4
    for i, (c, point, expansion) in enumerate(zip(ctxs[1:], points, expansions), 1):
        assert c["parent"] == 0 and c["inherited"] == full_length(ctxs[0])  # the whole skeleton, shared
        own = decode(runtime, c["tokens"])
        assert own.startswith(f"{i}. {point}:") and expansion in own

    # The plain output: the skeleton, then each point followed by its expansion.
    text = measure("skeleton_of_thought", *args).output
    expected = "Skeleton:\n" + "".join(f"{i}. {p}\n" for i, p in enumerate(points, 1)) + "\n" + \
               "".join(f"{i}. {p}\n   {e}\n" for i, (p, e) in enumerate(zip(points, expansions), 1))
    assert text == expected


def test_recursion_of_thought_splices_sub_answers_into_the_parent(runtime, measure):
    problem = "What is the population of the capital of France?"
    r = measure("recursion_of_thought", "--problem", problem, "--subproblems", 2, "--depth", 1,
                "--question-tokens", 10, "--answer-tokens", 8, "--json")
    result = r.json()
    check_trace(result, r.tokens)
    ctxs = result["contexts"]
    tree = result["tree"]
    assert tree["question"] == problem and len(tree["subs"]) == 2
    assert all(s["question"] and s["subs"] == [] for s in tree["subs"])
    assert len(ctxs) == 3

    root = decode(runtime, ctxs[0]["tokens"])
    fork_point = ctxs[1]["inherited"]
    for i, (c, sub) in enumerate(zip(ctxs[1:], tree["subs"]), 1):
        # each sub-problem is solved in a fork of the problem taken after its sub-questions were written
        assert c["parent"] == 0 and c["inherited"] == fork_point
        own = decode(runtime, c["tokens"])
        assert own.startswith(f"Now solve only sub-question {i}: {sub['question']}\n")
        assert sub["answer"] in own
    # the sub-answers are spliced back into the problem's context, not the sub-problems' own work
    assert "".join(f"Answer {i}: {s['answer']}\n" for i, s in enumerate(tree["subs"], 1)) in root
    assert "Now solve only" not in root
    assert root.rstrip().endswith(tree["answer"])
    assert fork_point < full_length(ctxs[0])
    assert re.search(r"Sub-questions:\n1\. .+\n2\. .+\n", root)
