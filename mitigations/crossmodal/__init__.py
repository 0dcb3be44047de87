from llm_limits.mitigations.crossmodal.core import (
    LOGIT_SCALE_MAX,
    SCHEDULES,
    alignment,
    balance_answers,
    centroid_gap,
    infonce,
    loss_weight,
    mean_pool,
    siglip,
    uniformity,
)
from llm_limits.mitigations.crossmodal.mitigation import ContrastiveParams, CrossModal, CrossModalConfig

__all__ = [
    "LOGIT_SCALE_MAX",
    "SCHEDULES",
    "ContrastiveParams",
    "CrossModal",
    "CrossModalConfig",
    "alignment",
    "balance_answers",
    "centroid_gap",
    "infonce",
    "loss_weight",
    "mean_pool",
    "siglip",
    "uniformity",
]
