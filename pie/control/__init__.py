"""The control layer: command queues, the batch scheduler, the page pools, the batch loop, and the one
form of a forward pass (`ForwardCommand`).

The compiled core (`pie._ext._control`, C++) holds no tensors and never takes the GIL on its hot
paths: producers submit commands lock-free, waiting on a Future releases the GIL, and the batch
loop waits for batches in `Scheduler.take` without it. Other compiled modules (the runtime's host
functions) reach the queues, futures and page pools through a C ABI without the GIL:
`csrc/control/control_api.h`, exported as the capsule `pie._ext._control._C_API`. What the batch loop
runs for each command kind on the model runner is in `pie.control.handlers`.

>>> from pie.control import BatchLoop, Scheduler
>>> scheduler = Scheduler(max_batch_requests=32, max_batch_tokens=1024)
>>> queue = scheduler.create_queue(instance_id=1)
>>> future = queue.submit(7, payload="request", num_tokens=4)
>>> with BatchLoop(scheduler, {7: lambda payloads: [p.upper() for p in payloads]}):
...     future.result(timeout=5)
'REQUEST'
"""

from pie.control._control import (
    Batch,
    CommandCancelled,
    CommandFailed,
    CommandKind,
    CommandQueue,
    ControlError,
    CopySpan,
    ForwardCommand,
    ForwardLimits,
    ForwardOutput,
    Future,
    GenerationStream,
    InstanceTerminated,
    InvalidHandle,
    OutputValue,
    PageCopyCommand,
    PagePool,
    PinnedPages,
    Policy,
    Priority,
    QueueClosed,
    QuotaExceeded,
    Sampler,
    SamplerKind,
    Scheduler,
    TokenBytes,
    drive_native_producers,
    wakeup_round_trip_ns,
)
from pie.control.batch_loop import BatchHandler, BatchLoop
from pie.control.config import POLICIES, SchedulerConfig
from pie.control.plane import ControlPlane, RunnerPools, token_table

__all__ = [
    "Batch",
    "BatchHandler",
    "BatchLoop",
    "CommandCancelled",
    "CommandFailed",
    "CommandKind",
    "CommandQueue",
    "ControlError",
    "ControlPlane",
    "CopySpan",
    "ForwardCommand",
    "ForwardLimits",
    "ForwardOutput",
    "Future",
    "GenerationStream",
    "InstanceTerminated",
    "InvalidHandle",
    "OutputValue",
    "PageCopyCommand",
    "PagePool",
    "PinnedPages",
    "POLICIES",
    "Policy",
    "Priority",
    "QueueClosed",
    "QuotaExceeded",
    "RunnerPools",
    "Sampler",
    "SamplerKind",
    "Scheduler",
    "SchedulerConfig",
    "TokenBytes",
    "drive_native_producers",
    "token_table",
    "wakeup_round_trip_ns",
]
