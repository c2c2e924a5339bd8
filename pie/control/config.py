"""Configuration of the control layer: one frozen dataclass, validated on construction."""

from __future__ import annotations

from dataclasses import dataclass

from pie.control._control import Policy, Scheduler

POLICIES: dict[str, Policy] = {
    "adaptive": Policy.ADAPTIVE,
    "eager": Policy.EAGER,
    "k": Policy.FIXED_K,
    "t": Policy.FIXED_T,
    "k_or_t": Policy.K_OR_T,
}


@dataclass(frozen=True)
class SchedulerConfig:
    """How the batch scheduler dispatches (Pie's table 5 policies).

    - ``adaptive``: at once when the engine is idle; after a batch, accumulate until the recent
      high-water batch size (max of the last ``high_water_window`` batches), the token budget, or
      ``deadline`` seconds.
    - ``eager``: whatever is ready, at once.
    - ``k``: when ``k`` commands are ready (batches of at most ``k``); dispatches fewer only when no
      open queue is left that could add one.
    - ``t``: when the oldest ready command has waited ``t`` seconds.
    - ``k_or_t``: whichever of the two comes first (batches of at most ``k``).

    A batch that is full (``max_batch_requests`` or ``max_batch_tokens``) is dispatched under every
    policy.

    >>> SchedulerConfig(policy="k_or_t", k=8, t=0.005).build(max_batch_requests=64, max_batch_tokens=4096).policy
    <Policy.K_OR_T: 4>
    """

    policy: str = "adaptive"
    k: int = 0
    t: float = 0.0
    deadline: float = 0.002
    high_water_window: int = 8

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"unknown scheduling policy {self.policy!r}; choose one of {', '.join(POLICIES)}")
        if self.policy in ("k", "k_or_t") and self.k < 1:
            raise ValueError(f"policy {self.policy!r} needs k >= 1, got {self.k}")
        if self.policy in ("t", "k_or_t") and not self.t > 0:
            raise ValueError(f"policy {self.policy!r} needs t > 0 seconds, got {self.t}")
        if not self.deadline >= 0:
            raise ValueError(f"deadline must be >= 0 seconds, got {self.deadline}")
        if self.high_water_window < 1:
            raise ValueError(f"high_water_window must be >= 1, got {self.high_water_window}")

    def build(self, max_batch_requests: int, max_batch_tokens: int) -> Scheduler:
        """A scheduler with this policy and the model runner's batch limits."""
        return Scheduler(max_batch_requests, max_batch_tokens, POLICIES[self.policy], k=self.k, t=self.t,
                         deadline=self.deadline, high_water_window=self.high_water_window)
