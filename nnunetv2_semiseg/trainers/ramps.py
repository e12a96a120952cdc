"""Ramp-up schedules for unsupervised loss weights.

All schedules are expressed on the *fraction of total training iterations* (0 at the first optimizer step, 1 at
the last), so that they stay meaningful when a user changes nnU-Net's ``num_epochs`` or
``num_iterations_per_epoch``. The SSL4MIS family of codebases ramps over ``R`` "epochs" of 150 iterations
(methods.md §1.1); ``ramp_length`` here is the same length divided by the total number of iterations
(e.g. SS-Net LA: 6000 / 15000 = 0.4).
"""
import math


def _clipped_progress(fraction: float, ramp_length: float) -> float:
    if ramp_length <= 0:
        return 1.0
    return min(max(fraction / ramp_length, 0.0), 1.0)


def sigmoid_rampup(fraction: float, ramp_length: float) -> float:
    """exp(-5 (1 - t)^2) with t = clip(fraction / ramp_length, 0, 1); 1 when ramp_length is 0.

    Source: Laine & Aila 2017 ("Temporal ensembling"), as used by SSL4MIS / SS-Net ``ramps.sigmoid_rampup``.
    At t = 0 the value is exp(-5) ~ 0.0067, not 0.
    """
    t = _clipped_progress(fraction, ramp_length)
    return float(math.exp(-5.0 * (1.0 - t) ** 2))


def linear_rampup(fraction: float, ramp_length: float) -> float:
    """t = clip(fraction / ramp_length, 0, 1); 1 when ramp_length is 0."""
    return float(_clipped_progress(fraction, ramp_length))
