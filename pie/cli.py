"""The `pie` command: generate | run | serve | config | model (add, list, remove)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
from pathlib import Path


def _engine_args(p: argparse.ArgumentParser) -> None:
    from pie.engine.model_store import DEFAULT_MODEL

    p.add_argument("--model", default=DEFAULT_MODEL, help=f"model name or folder (default {DEFAULT_MODEL})")
    p.add_argument("--device", default="auto",
                   help="cpu, cuda or cuda:N (default auto: the first CUDA device when there is one, else cpu)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights and KV cache (default auto: bfloat16 on CUDA, float32 on the CPU)")
    p.add_argument("--page-size", type=int, default=16, help="KV page size in tokens")
    p.add_argument("--kv-cache-mb", type=int, default=1024, help="KV cache size in MiB")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--tensor-parallel", type=int, default=1, metavar="N",
                   help="split the model over N processes (CPU, gloo; default 1)")


def _engine_config(args: argparse.Namespace):
    from pie.engine.config import EngineConfig, resolve_device

    device = resolve_device(args.device)
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if device.startswith("cuda") else "float32")
    return EngineConfig(dtype=dtype, device=device, page_size=args.page_size, kv_cache_mb=args.kv_cache_mb,
                        threads=args.threads)


def cmd_generate(args: argparse.Namespace) -> int:
    from pie.control.generate import GenerationParams, generate
    from pie.engine.model import Model

    params = GenerationParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                              top_k=args.top_k, min_p=args.min_p, seed=args.seed, stop=tuple(args.stop or ()),
                              ignore_eos=args.ignore_eos)
    if args.prompts_file is not None and not os.path.isfile(args.prompts_file):
        raise FileNotFoundError(f"--prompts-file {args.prompts_file}: no such file")
    model = Model(args.model, _engine_config(args), seed=args.seed, tensor_parallel=args.tensor_parallel)
    if args.prompts_file is not None:
        from pie.control.generate import run_prompts_file

        return run_prompts_file(model, args.prompts_file, params, sys.stdout, system=args.system, raw=args.raw)
    out = generate(model, args.prompt, params, system=args.system, raw=args.raw)
    print(out.text)
    return 0


def expand_file_arguments(arguments: list[str]) -> list[str]:
    """`@PATH` -> the text of the file PATH (read here, on the client side: an inferlet has no
    filesystem); `@@...` -> a literal `@...`."""
    out = []
    for arg in arguments:
        if arg.startswith("@@"):
            out.append(arg[1:])
        elif arg.startswith("@") and len(arg) > 1:
            try:
                out.append(Path(arg[1:]).read_text())
            except OSError as e:
                raise FileNotFoundError(f"inferlet argument {arg}: cannot read {arg[1:]}: {e.strerror}") from None
        else:
            out.append(arg)
    return out


def cmd_run(args: argparse.Namespace) -> int:
    _check_trace_path(args.trace)  # before the run, not after it
    if args.server is not None:
        return _run_on_server(args)
    from pie.engine.model import Model
    from pie.runtime import Runtime, RuntimeConfig, resolve_inferlet

    path = resolve_inferlet(args.inferlet)  # fail fast, before loading the model
    inferlet_args = expand_file_arguments(args.inferlet_args)
    config = RuntimeConfig(deadline_s=args.deadline, memory_mb=args.memory_mb,
                           http_allow=tuple(args.http_allow or ()))
    model = Model(args.model, _engine_config(args), tensor_parallel=args.tensor_parallel)

    def out(message: str) -> None:
        sys.stdout.write(message)
        sys.stdout.flush()

    def log(message: str) -> None:
        sys.stderr.write(message)
        sys.stderr.flush()

    with Runtime(model, config) as runtime:
        instance = runtime.launch(path, inferlet_args, on_output=out, on_log=log, trace=args.trace is not None)

        def forward_stdin() -> None:  # each line is a client message; "" marks the end of input
            for line in sys.stdin:
                instance.send(line)
            instance.send("")

        threading.Thread(target=forward_stdin, name="pie-run-stdin", daemon=True).start()
        result = instance.wait()
    _write_trace(args.trace, result.trace)
    if result.return_value is not None:
        print(result.return_value)
    if result.error is not None:
        print(f"pie: error: {path.name}: {result.error}", file=sys.stderr)
        return 1
    return 0


def _check_trace_path(path: str | None) -> None:
    if path is None:
        return
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path) or not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise OSError(f"--trace {path}: not a file that can be written (its folder must exist and be writable)")


def _write_trace(path: str | None, trace: dict | None) -> None:
    """--trace FILE: the instance's Chrome trace (open it in https://ui.perfetto.dev or chrome://tracing)."""
    if path is None:
        return
    if trace is None:
        print(f"pie: warning: no trace came back; {path} not written", file=sys.stderr)
        return
    with open(path, "w") as f:
        json.dump(trace, f)
    dropped = trace.get("otherData", {}).get("dropped_events", 0)
    print(f"pie: trace of {len(trace['traceEvents'])} events written to {path}"
          + (f" ({dropped} more dropped)" if dropped else "") + " (open it in https://ui.perfetto.dev)",
          file=sys.stderr)


def cmd_build(args: argparse.Namespace) -> int:
    import time

    from pie.runtime.build import build_inferlet

    t0 = time.perf_counter()
    out = build_inferlet(args.dir, args.output, progress=True)
    print(f"{out} ({out.stat().st_size / 2**20:.1f} MiB) built in {time.perf_counter() - t0:.1f} s")
    return 0


def _run_on_server(args: argparse.Namespace) -> int:
    """`pie run --server URL`: the inferlet runs on a `pie serve` (a local file is uploaded first)."""
    from pie.client import Client, PieError

    if args.http_allow:
        raise ValueError("--http-allow does not apply with --server: the server's configuration decides")
    parser_defaults = {"deadline": 600.0, "memory_mb": 256}
    limits = {"deadline_s": args.deadline if args.deadline != parser_defaults["deadline"] else None,
              "memory_mb": args.memory_mb if args.memory_mb != parser_defaults["memory_mb"] else None}
    name = args.inferlet
    if name.endswith((".py", ".wasm", ".wat")) and not os.path.isfile(name):
        raise FileNotFoundError(f"inferlet file {name} does not exist")
    token = args.token or os.environ.get("PIE_TOKEN")
    try:
        with Client(args.server, token) as client:
            instance = client.launch(name, expand_file_arguments(args.inferlet_args), trace=args.trace is not None,
                                     **limits)

            def forward_stdin() -> None:  # each line is a client message; "" marks the end of input
                try:
                    for line in sys.stdin:
                        instance.send(line)
                    instance.send("")
                except (PieError, RuntimeError, OSError, ValueError):  # the instance or the connection ended
                    pass

            threading.Thread(target=forward_stdin, name="pie-run-stdin", daemon=True).start()
            for event in instance.events():
                if event.type == "output":
                    sys.stdout.write(event.data)
                    sys.stdout.flush()
                elif event.type == "log":
                    sys.stderr.write(event.data)
                    sys.stderr.flush()
            result = instance.result
    except PieError as e:
        print(f"pie: error: {args.server}: {e}", file=sys.stderr)
        return 1
    _write_trace(args.trace, result.trace)
    if result.return_value is not None:
        print(result.return_value)
    if result.error is not None:
        print(f"pie: error: {os.path.basename(name)}: {result.error}", file=sys.stderr)
        return 1
    return 0


def _server_config(args: argparse.Namespace):
    from pie.server.config import load_config

    cfg = load_config(args.config)
    server = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    model = {k: v for k, v in (("name", args.model), ("data_parallel", args.data_parallel),
                               ("tensor_parallel", args.tensor_parallel)) if v is not None}
    return cfg.replace(server=server, model=model)


def cmd_serve(args: argparse.Namespace) -> int:
    from pie.server.app import serve

    return serve(_server_config(args))


def cmd_config(args: argparse.Namespace) -> int:
    cfg = _server_config(args)
    if cfg.auth.token:
        cfg = cfg.replace(auth={"token": "***"})
    print(cfg.to_toml(), end="")
    return 0


def cmd_model_add(args: argparse.Namespace) -> int:
    from pie.engine.model_store import ModelStore

    entry = ModelStore().add(args.spec, name=args.name, keep_quantized=args.keep_quantized)
    print(f"{entry.name}: {entry.architecture} at {entry.path}")
    return 0


def cmd_model_add_adapter(args: argparse.Namespace) -> int:
    from pie.engine.adapter_store import AdapterStore

    entry = AdapterStore().add(args.path, name=args.name, base=args.base)
    print(f"{entry.name}: LoRA rank {entry.rank} adapter of {entry.base} at {entry.path}")
    return 0


def cmd_model_list(args: argparse.Namespace) -> int:
    from pie.engine.adapter_store import AdapterStore
    from pie.engine.model_store import KNOWN_MODELS, ModelStore

    entries = ModelStore().list()
    for e in entries:
        print(f"{e.name}\t{e.architecture}\t{e.size_bytes / 2**20:.0f} MiB\t{e.source}")
    for a in AdapterStore().list():
        print(f"{a.name}\tLoRA adapter of {a.base}\trank {a.rank}\t{a.source}")
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
    g.add_argument("--ignore-eos", action="store_true", help="generate max-tokens tokens even past EOS")
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--system", default=None, help="system message")
    g.add_argument("--raw", action="store_true", help="do not apply the chat template")
    _engine_args(g)
    g.set_defaults(func=cmd_generate)

    r = sub.add_parser("run", help="run an inferlet in an embedded engine (no server)",
                       usage="pie run NAME|PATH [--server URL] [--model M] [--deadline S] [--memory-mb N] [--http-allow HOST[:PORT]]... [--trace FILE] -- ARGS...",
                       description="ARGS go to the inferlet (sys.argv[1:]); an argument @FILE is replaced by the "
                       "text of FILE (read by pie run: inferlets have no filesystem); @@x passes @x.")
    r.add_argument("inferlet", help="a bundled example (e.g. text_completion) or a .py / .wasm file")
    r.add_argument("inferlet_args", nargs="*", metavar="ARGS", help="the inferlet's arguments, after --")
    r.add_argument("--deadline", type=float, default=600.0, help="wall-clock limit in seconds (0 = none)")
    r.add_argument("--memory-mb", type=int, default=256, help="linear-memory cap of the instance in MiB")
    r.add_argument("--http-allow", action="append", metavar="HOST[:PORT]",
                   help="a host the inferlet may reach with http.fetch (repeatable; none by default)")
    r.add_argument("--server", default=None, metavar="URL",
                   help="run on a `pie serve` (ws://HOST:PORT) instead of an embedded engine")
    r.add_argument("--token", default=None, help="the server's token (default: $PIE_TOKEN)")
    r.add_argument("--trace", default=None, metavar="FILE",
                   help="write the instance's Chrome/Perfetto trace (host calls, forward passes, outputs) as JSON")
    _engine_args(r)
    r.set_defaults(func=cmd_run)

    s = sub.add_parser("serve", help="serve the websocket protocol and the OpenAI-compatible API")
    c = sub.add_parser("config", help="print the effective server configuration (TOML)")
    for p in (s, c):
        p.add_argument("--config", default=None, metavar="FILE", help="a TOML configuration file (pie.toml)")
        p.add_argument("--host", default=None, help="listen address (default 127.0.0.1)")
        p.add_argument("--port", type=int, default=None, help="listen port (default 8080; 0 = any free one)")
        p.add_argument("--model", default=None, help="model name or folder (default smollm2-135m)")
        p.add_argument("--data-parallel", type=int, default=None, metavar="M",
                       help="engine replicas behind the one endpoint, each with its own weights and KV cache "
                            "(default 1; [model] data_parallel)")
        p.add_argument("--tensor-parallel", type=int, default=None, metavar="N",
                       help="split the model over N processes, heads and MLP sharded (CPU, gloo; "
                            "default 1; [model] tensor_parallel)")
    s.set_defaults(func=cmd_serve)
    c.set_defaults(func=cmd_config)

    b = sub.add_parser("build", help="build DIR (main.py, modules, requirements.txt) into a standalone .wasm component",
                       usage="pie build DIR [-o OUT.wasm]")
    b.add_argument("dir", metavar="DIR", help="folder with main.py (the entry script), other .py modules and "
                   "an optional requirements.txt of pure-Python packages")
    b.add_argument("-o", "--output", default=None, metavar="OUT.wasm",
                   help="the component (default DIR/<DIR name>.wasm)")
    b.set_defaults(func=cmd_build)

    m = sub.add_parser("model", help="manage the model cache ($PIE_HOME/models)")
    msub = m.add_subparsers(dest="model_command", required=True)
    a = msub.add_parser("add", help="add a known model, a HuggingFace folder or a .gguf file")
    a.add_argument("spec")
    a.add_argument("--name", default=None)
    a.add_argument("--keep-quantized", action="store_true",
                   help="keep a GGUF's quantized linear layers packed (CPU kernels multiply them so; today slower "
                        "than the default, float32)")
    a.set_defaults(func=cmd_model_add)
    aa = msub.add_parser("add-adapter", help="register a PEFT LoRA adapter folder for a base model",
                         usage="pie model add-adapter PATH --name N [--base MODEL]")
    aa.add_argument("path", metavar="PATH", help="a PEFT LoRA folder (adapter_config.json, adapter_model.safetensors)")
    aa.add_argument("--name", required=True, help="its name (what /v1 `model` and inferlets select it by)")
    aa.add_argument("--base", default="smollm2-135m", help="the base model it adapts (default smollm2-135m)")
    aa.set_defaults(func=cmd_model_add_adapter)
    ls = msub.add_parser("list", help="list added models and adapters")
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
