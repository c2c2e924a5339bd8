"""The application layer: inferlets (WebAssembly components) driving the engine through the WIT API.

>>> from pie.engine.model import Model                                       # doctest: +SKIP
>>> from pie.runtime import Runtime
>>> with Runtime(Model()) as rt:                                               # doctest: +SKIP
...     print(rt.run("text_completion", ["--prompt", "What is the capital of France?",
...                                      "--temperature", "0"]).output, end="")
The capital of France is Paris.
"""

from pie.runtime.components import InvalidComponent
from pie.runtime.config import RuntimeConfig
from pie.runtime.runtime import InferletNotFound, Runtime, resolve_bundled, resolve_inferlet
from pie.runtime.instance import Instance, InstanceError, InstanceResult

__all__ = ["InferletNotFound", "Instance", "InstanceError", "InstanceResult", "InvalidComponent", "Runtime",
           "RuntimeConfig", "resolve_bundled", "resolve_inferlet"]
