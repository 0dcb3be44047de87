"""Errors a user can cause, kept apart from bugs so the CLI can answer them in one line."""

from __future__ import annotations

import torch


class UserError(Exception):
    """A mistake in the user's own input (recipe, data, paths). The CLI prints ``str(err)`` on one line and exits 2."""


def check_finite(loss: torch.Tensor, step: int) -> None:
    """Stop the run with one clear line when the loss is NaN or infinite, before the optimizer step applies it: the
    checkpoints already written stay as they are (the last one predates the bad step).

    >>> check_finite(torch.tensor(1.0), 3)
    >>> check_finite(torch.tensor(float("nan")), 3)
    Traceback (most recent call last):
    ...
    llm_limits.trainers.recipe.errors.UserError: train: the loss is nan at step 3; stopped before applying it (checkpoints/ holds the run up to its last save; lower trainer.lr or set trainer.grad_clip, then --resume)
    """
    if not bool(torch.isfinite(loss.detach()).all()):
        raise UserError(
            f"train: the loss is {float(loss.detach()):g} at step {step}; stopped before applying it (checkpoints/ "
            "holds the run up to its last save; lower trainer.lr or set trainer.grad_clip, then --resume)"
        )
