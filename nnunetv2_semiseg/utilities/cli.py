"""Argument types shared by the package's commands."""
import argparse
from typing import Callable


def process_count(minimum: int, hint: str) -> Callable[[str], int]:
    """argparse type for a process count: an integer >= ``minimum``; ``hint`` says what to pass instead
    (nnU-Net's -np needs at least one process; -npp/-nps accept 0 = no worker processes)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f'{text!r} is not an integer') from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f'{value} processes: {hint}')
        return value
    return parse


# -np of the converters and of the unlabeled preprocessing
positive_int = process_count(1, 'pass at least 1')
# -npp/-nps of the pseudo-labelling
non_negative_int = process_count(0, 'pass 0 (no workers) or more')
