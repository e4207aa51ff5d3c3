"""Argument types the scripts of this folder share."""

import argparse


def at_least(least: int):
    """An argparse type: an int >= ``least`` (a bad value is argparse's one line, exit 2)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"{value} is below {least}")
        return value
    return parse
