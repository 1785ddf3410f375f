"""Commands that work on written checkpoints (show, decode, verify, squash, dedup)."""

from __future__ import annotations

import argparse


def add_commands(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Register the checkpoint commands on the ``wpdump`` parser."""
