"""The `pie` command: generate | run | model (add, list, remove)."""

from __future__ import annotations

import argparse
import os
import sys
import threading


def _engine_args(p: argparse.ArgumentParser) -> None:
    from pie.engine.model_store import DEFAULT_MODEL

    p.add_argument("--model", default=DEFAULT_MODEL, help=f"model name or folder (default {DEFAULT_MODEL})")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--page-size", type=int, default=16, help="KV page size in tokens")
    p.add_argument("--kv-cache-mb", type=int, default=1024, help="KV cache size in MiB")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")


def _engine_config(args: argparse.Namespace):
    from pie.engine.config import EngineConfig

    return EngineConfig(dtype=args.dtype, page_size=args.page_size, kv_cache_mb=args.kv_cache_mb, threads=args.threads)


def cmd_generate(args: argparse.Namespace) -> int:
    from pie.engine.generate import Engine, GenerationParams

    params = GenerationParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                              top_k=args.top_k, min_p=args.min_p, seed=args.seed, stop=tuple(args.stop or ()))
    if args.prompts_file is not None and not os.path.isfile(args.prompts_file):
        raise FileNotFoundError(f"--prompts-file {args.prompts_file}: no such file")
    engine = Engine(args.model, _engine_config(args), seed=args.seed)
    if args.prompts_file is not None:
        from pie.control.generate import run_prompts_file

        return run_prompts_file(engine, args.prompts_file, params, sys.stdout, system=args.system, raw=args.raw)
    out = engine.generate(args.prompt, params, system=args.system, raw=args.raw)
    print(out.text)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from pie.engine.generate import Engine
    from pie.runtime import Runtime, RuntimeConfig, resolve_inferlet

    path = resolve_inferlet(args.inferlet)  # fail fast, before loading the model
    config = RuntimeConfig(deadline_s=args.deadline, memory_mb=args.memory_mb,
                           http_allow=tuple(args.http_allow or ()))
    engine = Engine(args.model, _engine_config(args))

    def out(message: str) -> None:
        sys.stdout.write(message)
        sys.stdout.flush()

    def log(message: str) -> None:
        sys.stderr.write(message)
        sys.stderr.flush()

    with Runtime(engine, config) as runtime:
        instance = runtime.launch(path, args.inferlet_args, on_output=out, on_log=log)

        def forward_stdin() -> None:  # each line is a client message; "" marks the end of input
            for line in sys.stdin:
                instance.send(line)
            instance.send("")

        threading.Thread(target=forward_stdin, name="pie-run-stdin", daemon=True).start()
        result = instance.wait()
    if result.return_value is not None:
        print(result.return_value)
    if result.error is not None:
        print(f"pie: error: {path.name}: {result.error}", file=sys.stderr)
        return 1
    return 0


def cmd_model_add(args: argparse.Namespace) -> int:
    from pie.engine.model_store import ModelStore

    entry = ModelStore().add(args.spec, name=args.name)
    print(f"{entry.name}: {entry.architecture} at {entry.path}")
    return 0


def cmd_model_list(args: argparse.Namespace) -> int:
    from pie.engine.model_store import KNOWN_MODELS, ModelStore

    entries = ModelStore().list()
    for e in entries:
        print(f"{e.name}\t{e.architecture}\t{e.size_bytes / 2**20:.0f} MiB\t{e.source}")
    missing = [n for n in KNOWN_MODELS if n not in {e.name for e in entries}]
    if missing:
        print(f"(known, not added yet: {', '.join(missing)})", file=sys.stderr)
    return 0


def cmd_model_remove(args: argparse.Namespace) -> int:
    from pie.engine.model_store import ModelStore

    ModelStore().remove(args.name)
    print(f"removed {args.name}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pie", description="Pie: a programmable LLM serving system")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text with the built-in loop (no inferlet)")
    source = g.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="the prompt")
    source.add_argument("--prompts-file", help="one prompt per line, run concurrently; prints one JSON object "
                        'per line in input order: {"prompt", "text", "tokens"}')
    g.add_argument("--max-tokens", type=int, default=256)
    g.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--system", default=None, help="system message")
    g.add_argument("--raw", action="store_true", help="do not apply the chat template")
    _engine_args(g)
    g.set_defaults(func=cmd_generate)

    r = sub.add_parser("run", help="run an inferlet in an embedded engine (no server)",
                       usage="pie run NAME|PATH [--model M] [--deadline S] [--memory-mb N] [--http-allow HOST[:PORT]]... -- ARGS...")
    r.add_argument("inferlet", help="a bundled example (e.g. text_completion) or a .py / .wasm file")
    r.add_argument("inferlet_args", nargs="*", metavar="ARGS", help="the inferlet's arguments, after --")
    r.add_argument("--deadline", type=float, default=600.0, help="wall-clock limit in seconds (0 = none)")
    r.add_argument("--memory-mb", type=int, default=256, help="linear-memory cap of the instance in MiB")
    r.add_argument("--http-allow", action="append", metavar="HOST[:PORT]",
                   help="a host the inferlet may reach with http.fetch (repeatable; none by default)")
    _engine_args(r)
    r.set_defaults(func=cmd_run)

    m = sub.add_parser("model", help="manage the model cache ($PIE_HOME/models)")
    msub = m.add_subparsers(dest="model_command", required=True)
    a = msub.add_parser("add", help="add a known model, a HuggingFace folder or a .gguf file")
    a.add_argument("spec")
    a.add_argument("--name", default=None)
    a.set_defaults(func=cmd_model_add)
    ls = msub.add_parser("list", help="list added models")
    ls.set_defaults(func=cmd_model_list)
    rm = msub.add_parser("remove", help="remove a model from the cache")
    rm.add_argument("name")
    rm.set_defaults(func=cmd_model_remove)
    return parser


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors that are the user's input (bad model, file, arguments, inferlet), reported as one line
    without a traceback (PIE_DEBUG=1 shows it). The engine's and the runtime's own input errors
    (BatchError, UnsupportedModelError, GGUFError, ModelFilesError, TokenizerError, InferletNotFound,
    InvalidComponent, ...) are ValueErrors."""
    from pie.engine.model_store import ModelStoreError

    return (ModelStoreError, MemoryError, ValueError, OSError)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except user_errors() as e:
        if os.environ.get("PIE_DEBUG"):  # developers: the whole traceback
            raise
        print(f"pie: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
