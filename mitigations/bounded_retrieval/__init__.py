from llm_limits.mitigations.bounded_retrieval.core import (
    CANDIDATE_MARGIN,
    TARGET_KINDS,
    build_record,
    exact_mask,
    overflows,
    pack,
    place,
    place_in_order,
    target_kind,
)
from llm_limits.mitigations.bounded_retrieval.mitigation import INJECTED, BoundedRetrieval, BoundedRetrievalConfig

__all__ = [
    "CANDIDATE_MARGIN",
    "INJECTED",
    "TARGET_KINDS",
    "BoundedRetrieval",
    "BoundedRetrievalConfig",
    "build_record",
    "exact_mask",
    "overflows",
    "pack",
    "place",
    "place_in_order",
    "target_kind",
]
