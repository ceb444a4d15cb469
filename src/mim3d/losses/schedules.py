"""Level-weight schedules of MiM's reconstruction terms (paper Table XII).

:func:`level_weights` gives the per-level weights ``w_l`` by which
:func:`~mim3d.losses.mim.mim_loss` multiplies the reconstruction terms, as a function of
training progress.
"""

from __future__ import annotations

# one definition of the choices: the config validates them, the schedules dispatch on them
from mim3d.config import SCHEDULES as LEVEL_SCHEDULES

__all__ = ["LEVEL_SCHEDULES", "level_weights"]


def _start_weight(schedule: str, level: int, levels: int) -> float:
    """Weight of ``level`` (1-based) at progress 0 for the level-dependent schedules."""
    if level == 1:
        return 1.0
    if levels == 2:  # level 2 is the last level: the last-level rule applies
        frac = 1.0
    else:  # 0 at level 2, 1 at level L, linear in between
        frac = (level - 2) / (levels - 2)
    if schedule == "coarse_to_fine":
        return 2.0 - 2.0 * frac
    return 2.0 * frac  # fine_to_coarse


def level_weights(schedule: str, *, levels: int, progress: float) -> list[float]:
    """Per-level reconstruction weights ``w_l`` at a point of training (Table XII).

    All schedules are linear in ``progress`` from a start weight to an end weight:

    * ``"concurrent"`` (the paper's "Simultaneously", its best and mim3d's default): all 1.
    * ``"coarse_to_fine"``: level 1 stays 1; level 2 goes 2 -> 1; the last level 0 -> 1.
      For ``L > 3`` the start weights of levels 2..L are interpolated linearly between 2 and 0.
    * ``"fine_to_coarse"``: level 1 stays 1; level 2 goes 0 -> 1; the last level 2 -> 1
      (interpolated likewise for ``L > 3``).
    * ``"level1_only"`` (Table XII's "w/o Coarse & Fine" row): level 1 is 1, the others 0.
      The paper's text says "all weights set to 0", but its table merges the level-1 cell as
      1 -> 1 for every row; a run with no loss at all would not be pre-training.

    With ``L = 2`` the second level is the last one, and the last-level rule wins (start 0 for
    coarse-to-fine, 2 for fine-to-coarse).

    Args:
        schedule: one of :data:`LEVEL_SCHEDULES`.
        levels: number of levels ``L >= 1``.
        progress: fraction of training done, in [0, 1].

    Returns:
        ``L`` weights, level 1 first.

    Raises:
        ValueError: on an unknown schedule, ``levels < 1`` or ``progress`` outside [0, 1].
    """
    if schedule not in LEVEL_SCHEDULES:
        raise ValueError(f"unknown level-weight schedule {schedule!r}; valid: "
                         f"{', '.join(LEVEL_SCHEDULES)}")
    if levels < 1:
        raise ValueError(f"levels must be >= 1; got {levels}")
    if not 0.0 <= progress <= 1.0:
        raise ValueError(f"progress must lie in [0, 1]; got {progress}")
    if schedule == "concurrent":
        return [1.0] * levels
    if schedule == "level1_only":
        return [1.0] + [0.0] * (levels - 1)
    weights = []
    for level in range(1, levels + 1):
        start = _start_weight(schedule, level, levels)
        weights.append(start + (1.0 - start) * progress)
    return weights
