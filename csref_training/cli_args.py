"""argparse types shared by the training CLIs."""

import argparse
from typing import Callable


def number_range(kind: type) -> Callable[[str], tuple]:
    """An argparse type for "low,high" -> (kind(low), kind(high)), rejecting low > high."""

    def parse(text: str) -> tuple:
        parts = text.split(",")
        if len(parts) != 2:
            raise argparse.ArgumentTypeError(f"expected two comma-separated numbers, got {text!r}")
        try:
            low, high = (kind(part) for part in parts)
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"{text!r}: {err}") from err
        if low > high:
            raise argparse.ArgumentTypeError(f"range {text!r} has its lower end above its upper end")
        return low, high

    return parse
