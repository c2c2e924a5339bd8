"""Configuration of the control layer: one frozen dataclass, validated on construction."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from pie.control._control import Policy, Scheduler

POLICIES: dict[str, Policy] = {
    "adaptive": Policy.ADAPTIVE,
    "eager": Policy.EAGER,
    "fixed_size": Policy.FIXED_SIZE,
    "fixed_wait": Policy.FIXED_WAIT,
    "size_or_wait": Policy.SIZE_OR_WAIT,
}

# The names of the first release (Pie's table 5: K, T, K-or-T), accepted with a DeprecationWarning
# until the next release.
DEPRECATED_POLICY_NAMES = {"k": "fixed_size", "t": "fixed_wait", "k_or_t": "size_or_wait"}
DEPRECATED_PARAMETER_NAMES = {"k": "batch_size", "t": "max_wait"}


def policy_name(name: str) -> str:
    """The policy's current name (an old one is translated, with a DeprecationWarning)."""
    if name in DEPRECATED_POLICY_NAMES:
        new = DEPRECATED_POLICY_NAMES[name]
        warnings.warn(f"scheduling policy {name!r} is now called {new!r}; the old name goes in the next release",
                      DeprecationWarning, stacklevel=3)
        return new
    return name


@dataclass(frozen=True)
class SchedulerConfig:
    """How the batch scheduler dispatches (Pie's table 5 policies).

    - ``adaptive``: at once when the engine is idle; after a batch, accumulate until the recent
      high-water batch size (max of the last ``high_water_window`` batches), the token budget, or
      ``deadline`` seconds.
    - ``eager``: whatever is ready, at once.
    - ``fixed_size``: when ``batch_size`` commands are ready (batches of at most ``batch_size``);
      dispatches fewer only when no open queue is left that could add one.
    - ``fixed_wait``: when the oldest ready command has waited ``max_wait`` seconds.
    - ``size_or_wait``: whichever of the two comes first (batches of at most ``batch_size``).

    A batch that is full (``max_batch_requests`` or ``max_batch_tokens``) is dispatched under every
    policy. The first release's names (policies ``k``, ``t``, ``k_or_t``; parameters ``k``, ``t``) are
    accepted by `from_dict` with a DeprecationWarning.

    >>> SchedulerConfig(policy="size_or_wait", batch_size=8, max_wait=0.005).build(64, 4096).policy
    <Policy.SIZE_OR_WAIT: 4>
    """

    policy: str = "adaptive"
    batch_size: int = 0
    max_wait: float = 0.0
    deadline: float = 0.002
    high_water_window: int = 8

    def __post_init__(self) -> None:
        if self.policy in DEPRECATED_POLICY_NAMES:
            object.__setattr__(self, "policy", policy_name(self.policy))
        if self.policy not in POLICIES:
            raise ValueError(f"unknown scheduling policy {self.policy!r}; choose one of {', '.join(POLICIES)}")
        if self.policy in ("fixed_size", "size_or_wait") and self.batch_size < 1:
            raise ValueError(f"policy {self.policy!r} needs batch_size >= 1, got {self.batch_size}")
        if self.policy in ("fixed_wait", "size_or_wait") and not self.max_wait > 0:
            raise ValueError(f"policy {self.policy!r} needs max_wait > 0 seconds, got {self.max_wait}")
        if not self.deadline >= 0:
            raise ValueError(f"deadline must be >= 0 seconds, got {self.deadline}")
        if self.high_water_window < 1:
            raise ValueError(f"high_water_window must be >= 1, got {self.high_water_window}")

    @classmethod
    def from_dict(cls, values: dict) -> "SchedulerConfig":
        """From keyword values, translating the first release's parameter names (k, t)."""
        values = dict(values)
        for old, new in DEPRECATED_PARAMETER_NAMES.items():
            if old in values:
                warnings.warn(f"scheduler parameter {old!r} is now called {new!r}; the old name goes in the next "
                              "release", DeprecationWarning, stacklevel=2)
                if new in values:
                    raise ValueError(f"give {new!r} or its old name {old!r}, not both")
                values[new] = values.pop(old)
        return cls(**values)

    def build(self, max_batch_requests: int, max_batch_tokens: int) -> Scheduler:
        """A scheduler with this policy and the model runner's batch limits."""
        return Scheduler(max_batch_requests, max_batch_tokens, POLICIES[self.policy], batch_size=self.batch_size,
                         max_wait=self.max_wait, deadline=self.deadline, high_water_window=self.high_water_window)
