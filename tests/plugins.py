"""Verifiers given to Braid by import path in the tests (`tests.plugins:NAME`)."""

from __future__ import annotations


def accept_any(prompt: str, text: str) -> bool:
    """Every answer is right: with first_success the first sample to finish wins."""
    return True


def reject_all(prompt: str, text: str) -> bool:
    return False


NOT_A_FUNCTION = 3
