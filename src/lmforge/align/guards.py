"""Guards for the on-policy methods (GRPO, PPO): a KL or reward blow-up stops the run, or warns, naming the setting.

A policy that runs away from its reference (KL in the tens of nats per token) or a reward that leaps past what
the task can give (a reward model being exploited) is the failure RL users meet most; it is cheaper to stop at
the step it happens, with the setting that caught it, than to find it in the samples afterwards. The caller
checks the measures of every rollout, the same on every rank, so all ranks stop together.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

log = logging.getLogger(__name__)

OnBlowup = Literal["stop", "warn"]


class AlignmentDiverged(RuntimeError):
    """An RL run's KL to its reference or its reward went past its limit (or was not finite) with on_blowup=stop."""


@dataclass(frozen=True)
class RLGuard:
    """Limits on the `kl` and `reward` measures of a step; `setting_prefix` ("grpo", "ppo") names the section
    whose `max_kl`, `max_reward` and `on_blowup` settings the messages point to. A limit of None checks only that
    the measure is finite. `kl_setting` is the section's KL weight, which the advice on a KL blow-up names (GRPO:
    beta; PPO: kl_coef)."""

    setting_prefix: str
    max_kl: float | None = None
    max_reward: float | None = None
    on_blowup: OnBlowup = "stop"
    kl_setting: str = "beta"

    def __post_init__(self) -> None:
        if self.on_blowup not in ("stop", "warn"):
            raise ValueError(f"{self.setting_prefix}.on_blowup={self.on_blowup!r}: expected stop or warn")

    def problems(self, metrics: Mapping[str, float]) -> list[str]:
        """What is wrong with a step's measures (empty when nothing is), each naming its setting."""
        p = self.setting_prefix
        found = []
        for name, limit, setting, advice in (
            ("kl", self.max_kl, "max_kl", f"lower the learning rate or raise {p}.{self.kl_setting}"),
            ("reward", self.max_reward, "max_reward", "check the reward for a loophole the policy exploits"),
        ):
            if name not in metrics:
                continue
            value = float(metrics[name])
            if not math.isfinite(value):
                found.append(f"{name} is {value} ({p}.{setting}={limit}): the run has diverged; {advice}")
            elif limit is not None and value > limit:
                found.append(f"{name} {value:.4g} exceeds {p}.{setting}={limit}: {advice}, or raise "
                             f"{p}.{setting}")  # fmt: skip
        return found

    def check(self, step: int, metrics: Mapping[str, float]) -> list[str]:
        """Raise AlignmentDiverged for a step past a limit (on_blowup=stop), or log a warning and return the
        messages (on_blowup=warn); returns [] for a step within the limits."""
        found = self.problems(metrics)
        if not found:
            return []
        message = f"step {step}: " + "; ".join(found)
        if self.on_blowup == "stop":
            raise AlignmentDiverged(f"{message} ({self.setting_prefix}.on_blowup=warn only warns)")
        log.warning("%s (%s.on_blowup=warn: training goes on)", message, self.setting_prefix)
        return [message]
