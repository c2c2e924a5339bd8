"""The control layer: command queues, the batch scheduler, the KV page pool and the engine loop.

The compiled core (`pie._ext._control`, C++) holds no tensors and never takes the GIL on its hot
paths: producers submit commands lock-free, waiting on a Future releases the GIL, and the engine
loop waits for batches in `Scheduler.take` without it. Other compiled modules (the runtime's host
functions) reach the queues, futures and page pools through a C ABI without the GIL:
`csrc/control/control_api.h`, exported as the capsule `pie._ext._control._C_API`.

>>> from pie.control import Scheduler, EngineLoop, CommandKind
>>> scheduler = Scheduler(max_batch_requests=32, max_batch_tokens=1024)
>>> queue = scheduler.create_queue(instance_id=1)
>>> future = queue.submit(CommandKind.FORWARD, payload="request", num_tokens=4)
>>> with EngineLoop(scheduler, {CommandKind.FORWARD: lambda payloads: [p.upper() for p in payloads]}):
...     future.result(timeout=5)
'REQUEST'
"""

from pie.control._control import (
    Batch,
    CommandCancelled,
    CommandFailed,
    CommandQueue,
    ControlError,
    Future,
    InstanceTerminated,
    InvalidHandle,
    PagePool,
    Policy,
    Priority,
    QueueClosed,
    QuotaExceeded,
    Scheduler,
    drive_native_producers,
    wakeup_round_trip_ns,
)
from pie.control.config import POLICIES, SchedulerConfig
from pie.control.engine_loop import BatchHandler, EngineLoop
from pie.control.kinds import CommandKind
from pie.control.plane import ControlPlane

__all__ = [
    "Batch",
    "BatchHandler",
    "CommandCancelled",
    "CommandFailed",
    "CommandKind",
    "CommandQueue",
    "ControlError",
    "ControlPlane",
    "EngineLoop",
    "Future",
    "InstanceTerminated",
    "InvalidHandle",
    "PagePool",
    "POLICIES",
    "Policy",
    "Priority",
    "QueueClosed",
    "QuotaExceeded",
    "Scheduler",
    "SchedulerConfig",
    "drive_native_producers",
    "wakeup_round_trip_ns",
]
