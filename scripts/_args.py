"""Argument types the scripts of this folder share."""

import argparse

MOST = 2**31 - 1  # above it a count overflows torch's sizes (a C++ error after the model is built)


def at_least(least: int):
    """An argparse type: an int from ``least`` to ``MOST`` (a bad value is argparse's one line, exit 2)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"{value} is below {least}")
        if value > MOST:
            raise argparse.ArgumentTypeError(f"{value} is above {MOST}")
        return value
    return parse
