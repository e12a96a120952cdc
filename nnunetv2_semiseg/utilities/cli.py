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


def accept_underscore_spellings(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Let every dashed long option (``--train-list``) also be spelled with underscores (``--train_list``), the style
    of nnU-Net's own long options (``--verify_dataset_integrity``); the dashed spelling keeps working. Call it after
    the last ``add_argument`` (idempotent). Returns ``parser``."""
    for action in list(parser._actions):
        for option in list(action.option_strings):
            if not option.startswith('--') or '-' not in option[2:]:
                continue
            alias = '--' + option[2:].replace('-', '_')
            # argparse has no public API to add a spelling to an existing option; both tables must know it.
            if alias not in parser._option_string_actions:
                action.option_strings.append(alias)
                parser._option_string_actions[alias] = action
    return parser
