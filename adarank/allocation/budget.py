"""Parameter budgets and the budget schedule (AdaLoRA, Zhang et al. 2023, §3.3 Eq. 12).

The budget is counted in **parameters**: a triplet of a layer with shape (d_out, d_in) costs
``d_in + d_out + 1``. The schedule is a pure function of the optimizer step::

    b(t) = b_0                                              t <  t_w          (warm-up)
    b(t) = b_T + (b_0 - b_T) · (1 - (t - t_w)/(T - t_w - t_f))³   t_w ≤ t < T - t_f   (cubic)
    b(t) = b_T                                              t ≥ T - t_f       (final, frozen)

``decay="linear"`` uses the first power instead of the cube; ``decay="constant"`` keeps
``b_T`` at every step (allocation then only redistributes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["resolve_budget", "schedule_points", "BudgetSchedule", "DECAYS", "SCHEDULE_DEFAULTS"]

DECAYS = ("cubic", "linear", "constant")
#: the one definition of the schedule defaults: :class:`BudgetSchedule`,
#: :meth:`BudgetSchedule.from_fractions`, the training integrations and the config schema
#: (``adarank.config.structured``) read them from here
SCHEDULE_DEFAULTS = {
    "init_budget_ratio": 1.5,
    "warmup_frac": 0.1,
    "final_frac": 0.2,
    "interval": 10,
    "decay": "cubic",
}


def schedule_points(
    final_budget: int,
    total_steps: int,
    *,
    init_budget_ratio: float = SCHEDULE_DEFAULTS["init_budget_ratio"],
    warmup_frac: float = SCHEDULE_DEFAULTS["warmup_frac"],
    final_frac: float = SCHEDULE_DEFAULTS["final_frac"],
    decay: str = SCHEDULE_DEFAULTS["decay"],
) -> tuple[int, int, int]:
    """``(init_budget, warmup_steps, final_steps)`` from fractions: the one rounding rule.

    ``init_budget = max(b_T, round(init_budget_ratio · b_T))`` (``b_T`` for ``decay="constant"``,
    which never uses it), ``warmup_steps = round(warmup_frac · T)``, ``final_steps =
    round(final_frac · T)``. :class:`BudgetSchedule`'s own defaults and
    :meth:`BudgetSchedule.from_fractions` both call it.
    """
    init = final_budget
    if decay != "constant":
        init = max(final_budget, round(init_budget_ratio * final_budget))
    return init, round(warmup_frac * total_steps), round(final_frac * total_steps)


def resolve_budget(budget: int | float | str, base_params: int, *, field: str = "budget") -> int:
    """Turn a user budget into a parameter count.

    Args:
        budget: an absolute count (``150000``, ``"150k"``, ``"1.2M"``) or a percentage of the
            base model's parameters (``"0.5%"``).
        base_params: number of (frozen) base-model parameters, for percentages.
        field: name used in error messages.

    Returns:
        the budget in parameters (a positive int).
    """
    if isinstance(budget, bool):
        raise TypeError(f"{field}={budget!r}: expected a parameter count or a percentage string")
    if isinstance(budget, str):
        text = budget.strip().replace("_", "").replace(",", "")
        try:
            if text.endswith("%"):
                pct = float(text[:-1])
                if not math.isfinite(pct) or not 0 < pct <= 100:
                    raise ValueError
                value = pct / 100.0 * base_params
            else:
                mult = {"k": 1e3, "K": 1e3, "m": 1e6, "M": 1e6}.get(text[-1:], 1.0)
                value = float(text[:-1] if mult != 1.0 else text) * mult
        except ValueError:
            raise ValueError(
                f"{field}={budget!r}: expected a parameter count (e.g. 150000, '150k') or a "
                "percentage of the base model's parameters in (0, 100] (e.g. '0.5%')"
            ) from None
    elif isinstance(budget, (int, float)):
        value = float(budget)
    else:
        raise TypeError(
            f"{field}={budget!r}: expected an int or a string, got {type(budget).__name__}"
        )
    if not math.isfinite(value) or value < 1:
        raise ValueError(f"{field}={budget!r}: the budget must be at least 1 parameter")
    return int(value)


@dataclass(frozen=True)
class BudgetSchedule:
    """Parameter budget as a pure function of the optimizer step.

    Args:
        final_budget: b_T, adapter parameters after the final allocation.
        total_steps: T, the number of optimizer steps of the run.
        init_budget: b_0 during warm-up; default ``init_budget_ratio × final_budget`` of
            :data:`SCHEDULE_DEFAULTS` (AdaLoRA's b_0 ≈ 1.5 b_T), rounded by
            :func:`schedule_points`.
        warmup_steps: t_w; default ``warmup_frac × total_steps`` (:data:`SCHEDULE_DEFAULTS`).
        final_steps: t_f (pattern frozen); default ``final_frac × total_steps``.
        decay: ``"cubic"`` (AdaLoRA), ``"linear"`` or ``"constant"``.
        interval: ΔT, re-allocate every ``interval`` optimizer steps.
        min_budget: parameters the per-layer ``min_rank`` bounds force (for validation).
        max_budget: parameters the per-layer ``max_rank`` bounds allow (for validation).
        grow_cooldown: no growth in the last ``grow_cooldown`` steps before the final phase so
            that new triplets have time to train before the final pattern is fixed; default
            ``max(2·interval, 10% of the decay phase)``.
    """

    final_budget: int
    total_steps: int
    init_budget: int | None = None
    warmup_steps: int | None = None
    final_steps: int | None = None
    decay: str = SCHEDULE_DEFAULTS["decay"]
    interval: int = SCHEDULE_DEFAULTS["interval"]
    min_budget: int = 0
    max_budget: int | None = None
    grow_cooldown: int | None = None

    def __post_init__(self) -> None:
        def _int(name: str, value, minimum: int) -> int:
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"{name}={value!r}: expected an integer ≥ {minimum}")
            return value

        _int("total_steps", self.total_steps, 1)
        _int("final_budget", self.final_budget, 1)
        _int("interval", self.interval, 1)
        if self.decay not in DECAYS:
            raise ValueError(f"decay={self.decay!r}: expected one of {DECAYS}")
        points = schedule_points(self.final_budget, self.total_steps, decay=self.decay)
        init = points[0] if self.init_budget is None else self.init_budget
        _int("init_budget", init, 1)
        if init < self.final_budget:
            raise ValueError(
                f"init_budget={init} is below final_budget={self.final_budget}: the budget "
                "schedule only decays (growth redistributes within it)"
            )
        warm = points[1] if self.warmup_steps is None else self.warmup_steps
        final = points[2] if self.final_steps is None else self.final_steps
        _int("warmup_steps", warm, 0)
        _int("final_steps", final, 0)
        if warm + final >= self.total_steps:
            raise ValueError(
                f"warmup_steps ({warm}) + final_steps ({final}) must be smaller than total_steps "
                f"({self.total_steps}); otherwise there is no step at which ranks can be "
                "re-allocated. Shorten the warm-up/final phases or train longer."
            )
        object.__setattr__(self, "init_budget", init)
        self.check_bounds(_int("min_budget", self.min_budget, 0), self.max_budget)
        decay_len = self.total_steps - warm - final
        cool = (
            max(2 * self.interval, round(0.1 * decay_len))
            if self.grow_cooldown is None
            else self.grow_cooldown
        )
        _int("grow_cooldown", cool, 0)
        object.__setattr__(self, "warmup_steps", warm)
        object.__setattr__(self, "final_steps", final)
        object.__setattr__(self, "grow_cooldown", cool)

    def check_bounds(self, min_params: int, max_params: int | None) -> None:
        """Raise if the budgets cannot be met within the per-layer rank bounds.

        Args:
            min_params: parameters forced by the ``min_rank`` bounds.
            max_params: parameters allowed by the ``max_rank`` bounds (None: unbounded).
        """
        if min_params > self.final_budget:
            raise ValueError(
                f"final budget {self.final_budget} params is below the {min_params} params that "
                "the per-layer min_rank bounds need; lower min_rank or raise the budget"
            )
        if max_params is not None and self.init_budget > max_params:
            over_final = self.final_budget > max_params
            which = "final budget" if over_final else "initial budget"
            value = self.final_budget if over_final else self.init_budget
            raise ValueError(
                f"{which} {value} params is above the {max_params} params that the per-layer "
                "max_rank bounds allow; raise max_rank or lower the budget (init_budget)"
            )

    @classmethod
    def from_fractions(
        cls,
        final_budget: int,
        total_steps: int,
        *,
        init_budget_ratio: float = SCHEDULE_DEFAULTS["init_budget_ratio"],
        warmup_frac: float = SCHEDULE_DEFAULTS["warmup_frac"],
        final_frac: float = SCHEDULE_DEFAULTS["final_frac"],
        warmup_steps: int | None = None,
        final_steps: int | None = None,
        interval: int = SCHEDULE_DEFAULTS["interval"],
        decay: str = SCHEDULE_DEFAULTS["decay"],
    ) -> BudgetSchedule:
        """The schedule a training integration builds from fractions of the run's length.

        The budget and the phase lengths are rounded by :func:`schedule_points` (the rule of
        ``BudgetSchedule``'s own defaults too); ``warmup_steps`` / ``final_steps`` given in
        steps override the fractions.

        Args:
            final_budget: b_T in parameters (see :func:`resolve_budget`).
            total_steps: T, optimizer steps of the run.
            init_budget_ratio: b_0 / b_T (≥ 1).
            warmup_frac: fraction of the steps before the first allocation, in [0, 1).
            final_frac: fraction of the steps with the rank pattern frozen, in [0, 1).
            warmup_steps: t_w in steps (overrides ``warmup_frac``).
            final_steps: t_f in steps (overrides ``final_frac``).
            interval: ΔT, optimizer steps between allocations.
            decay: ``"cubic"``, ``"linear"`` or ``"constant"``.

        Raises:
            ValueError: a fraction outside [0, 1), a ratio below 1, or an infeasible schedule.
        """
        for name, frac in (("warmup_frac", warmup_frac), ("final_frac", final_frac)):
            if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not 0 <= frac < 1:
                raise ValueError(f"{name}={frac!r}: expected a fraction in [0, 1)")
        ratio = init_budget_ratio
        numeric = isinstance(ratio, (int, float)) and not isinstance(ratio, bool)
        if not numeric or not 1 <= ratio < math.inf:
            raise ValueError(f"init_budget_ratio={ratio!r}: expected a number ≥ 1")
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"total_steps={total_steps!r}: expected an integer ≥ 1")
        init, warm, final = schedule_points(
            final_budget,
            total_steps,
            init_budget_ratio=ratio,
            warmup_frac=warmup_frac,
            final_frac=final_frac,
            decay=decay,
        )
        return cls(
            final_budget=final_budget,
            total_steps=total_steps,
            init_budget=init,
            warmup_steps=warm if warmup_steps is None else warmup_steps,
            final_steps=final if final_steps is None else final_steps,
            decay=decay,
            interval=interval,
        )

    @property
    def final_start(self) -> int:
        """First step of the frozen final phase (the step of the last allocation)."""
        return self.total_steps - self.final_steps

    def phase(self, step: int) -> str:
        if step < self.warmup_steps:
            return "warmup"
        return "final" if step >= self.final_start else "decay"

    def budget(self, step: int) -> int:
        """b(step) in parameters."""
        if self.decay == "constant" or step >= self.final_start:
            return self.final_budget
        if step < self.warmup_steps:
            return self.init_budget
        progress = (step - self.warmup_steps) / (self.final_start - self.warmup_steps)
        power = 3 if self.decay == "cubic" else 1
        span = self.init_budget - self.final_budget
        return int(self.final_budget + span * (1.0 - progress) ** power)

    def is_allocation_step(self, step: int) -> bool:
        """True at every ``interval``-th step of the decay phase and at the final-phase start."""
        if step == self.final_start:
            return True
        return self.warmup_steps <= step < self.final_start and step % self.interval == 0

    def allows_growth(self, step: int) -> bool:
        """Growth is allowed at allocation steps before the cool-down that precedes the final phase."""
        return self.warmup_steps <= step < self.final_start - self.grow_cooldown

    def allocation_steps(self) -> list[int]:
        return [s for s in range(self.total_steps + 1) if self.is_allocation_step(s)]
