"""Pure functions of the no-op mitigation: none; the identity on a batch, kept to show the folder's shape."""

from __future__ import annotations

from llm_limits.mitigations.base import Batch


def identity(batch: Batch) -> Batch:
    """Return ``batch`` unchanged (``[batch, seq]`` tensors)."""
    return batch
