"""Which checkpoint steps to keep: small policies, combined as a union.

Each policy looks only at what is on disk (step numbers and the metrics in the manifests), so
the decision is the same after the manager restarts. The manager applies retention only after a
new step is committed, and deletes nothing any policy keeps.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from .layout import StepInfo

Mode = Literal["min", "max"]


class Policy(Protocol):
    """Chooses the steps to keep among the committed ones."""

    def keep(self, steps: Sequence[StepInfo]) -> set[int]:
        """The step numbers this policy keeps."""
        ...

    def describe(self) -> str:
        """A short label for tables (``last 3``)."""
        ...


@dataclass(frozen=True)
class KeepLast:
    """The ``n`` most recent steps."""

    n: int

    def keep(self, steps: Sequence[StepInfo]) -> set[int]:
        return {info.step for info in sorted(steps, key=lambda i: i.step)[-self.n :]}

    def describe(self) -> str:
        return f"last {self.n}"


@dataclass(frozen=True)
class KeepAll:
    """Every step (``keep_last=None``)."""

    def keep(self, steps: Sequence[StepInfo]) -> set[int]:
        return {info.step for info in steps}

    def describe(self) -> str:
        return "all"


@dataclass(frozen=True)
class KeepBest:
    """The ``k`` steps with the best value of metric ``monitor`` (ties: the later step)."""

    k: int
    monitor: str
    mode: Mode = "min"

    def ranked(self, steps: Sequence[StepInfo]) -> list[StepInfo]:
        """Steps that have the metric, best first."""
        scored = [(info.metric(self.monitor), info) for info in steps]
        sign = 1.0 if self.mode == "min" else -1.0
        valid = [(sign * value, -info.step, info) for value, info in scored if value is not None]
        return [info for _, _, info in sorted(valid, key=lambda item: item[:2])]

    def keep(self, steps: Sequence[StepInfo]) -> set[int]:
        return {info.step for info in self.ranked(steps)[: self.k]}

    def describe(self) -> str:
        return f"best {self.k} ({self.monitor} {self.mode})"


@dataclass(frozen=True)
class KeepEvery:
    """Every step that is a multiple of ``n``, forever."""

    n: int

    def keep(self, steps: Sequence[StepInfo]) -> set[int]:
        return {info.step for info in steps if info.step % self.n == 0}

    def describe(self) -> str:
        return f"every {self.n}"


@dataclass(frozen=True)
class Union:
    """Keeps what any of its policies keeps."""

    policies: tuple[Policy, ...]

    def keep(self, steps: Sequence[StepInfo]) -> set[int]:
        kept: set[int] = set()
        for policy in self.policies:
            kept |= policy.keep(steps)
        return kept

    def kept_by(self, steps: Sequence[StepInfo]) -> dict[int, list[str]]:
        """For every step, the labels of the policies that keep it (empty: would be deleted)."""
        labels: dict[int, list[str]] = {info.step: [] for info in steps}
        for policy in self.policies:
            for step in policy.keep(steps):
                labels[step].append(policy.describe())
        return labels

    def describe(self) -> str:
        return " + ".join(policy.describe() for policy in self.policies)


def build(
    *,
    keep_last: int | None = 3,
    keep_best: int = 0,
    monitor: str | None = None,
    mode: str = "min",
    keep_every: int | None = None,
) -> Union:
    """The union of policies for the :class:`CheckpointManager` arguments, validated.

    Example:
        >>> build(keep_last=2, keep_best=1, monitor="loss").describe()
        'last 2 + best 1 (loss min)'
    """
    policies: list[Policy] = []
    if keep_last is None:
        policies.append(KeepAll())
    elif _positive(keep_last, "keep_last", "or None to keep every step"):
        policies.append(KeepLast(keep_last))
    if mode not in ("min", "max"):
        raise ValueError(f"mode must be 'min' or 'max', not {mode!r}")
    if keep_best:
        _positive(keep_best, "keep_best", "or 0")
        if not monitor:
            raise ValueError(
                f"keep_best={keep_best} needs monitor=<metric name> (e.g. monitor='val_loss')"
            )
        policies.append(KeepBest(keep_best, monitor, "min" if mode == "min" else "max"))
    if keep_every is not None and _positive(keep_every, "keep_every", "or None"):
        policies.append(KeepEvery(keep_every))
    return Union(tuple(policies))


def _positive(value: object, name: str, alternative: str) -> bool:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int {alternative}, not {value!r}")
    return True


def config(
    *, keep_last: int | None, keep_best: int, monitor: str | None, mode: str, keep_every: int | None
) -> dict[str, Any]:
    """The retention arguments as stored in each manifest (read back by :func:`from_config`)."""
    return {
        "keep_last": keep_last,
        "keep_best": keep_best,
        "monitor": monitor,
        "mode": mode,
        "keep_every": keep_every,
    }


def from_config(stored: object) -> Union | None:
    """Rebuild the policy a manifest recorded; None when absent or unreadable."""
    if not isinstance(stored, dict):
        return None
    try:
        return build(
            **{key: stored.get(key) for key in ("keep_last", "monitor", "keep_every")},
            keep_best=stored.get("keep_best") or 0,
            mode=stored.get("mode") or "min",
        )
    except (TypeError, ValueError):
        return None


def best_step(steps: Sequence[StepInfo], monitor: str, mode: str) -> int | None:
    """The step with the best ``monitor`` value, or None when no step has it."""
    ranked = KeepBest(1, monitor, "min" if mode == "min" else "max").ranked(steps)
    return ranked[0].step if ranked else None
