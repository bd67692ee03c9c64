"""Errors that reach users, each mapped to the CLI exit code of the output contract in docs/design.md."""

from __future__ import annotations


class HawqError(Exception):
    """Base class of every error hawqtool raises on purpose. ``exit_code`` is what the CLI returns."""

    exit_code = 1


class UsageError(HawqError):
    """Bad input from the user: a recipe, an argument, a model or data that cannot be used (exit 2)."""

    exit_code = 2


class RecipeError(UsageError):
    """A recipe key or value is wrong. The message names its dotted path and what is allowed."""


class BudgetNotMetError(HawqError):
    """Even the most precise candidate misses the accuracy budget (exit 3)."""

    exit_code = 3


class ExportError(HawqError):
    """ONNX export, validation or onnxruntime execution failed (exit 4)."""

    exit_code = 4
