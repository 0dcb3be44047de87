"""Pure functions of cross-modal alignment: the pooled embeddings, the contrastive losses (CLIP's InfoNCE, SigLIP's
sigmoid loss, both with several positives per row), the geometry terms against the modality gap (alignment,
uniformity, centroid distance), the answer-balancing data option, and the loss-weight schedule.

Embeddings are ``[B, D]`` tensors, one row per training row. ``positives`` is a ``[B, B]`` bool matrix: entry
``(i, j)`` is True when image ``i`` and caption ``j`` describe the same thing (in training: the same caption group).
Every loss L2-normalises its inputs itself, so callers pass raw pooled hidden states. Nothing here knows about models,
batches or the backend: torch and the stdlib only.
"""

from __future__ import annotations

import math
import random
from typing import Any

import torch
import torch.nn.functional as F

LOGIT_SCALE_MAX = math.log(100.0)
"""CLIP's ceiling on the learnable ``logit_scale`` (a temperature of at least 0.01); its floor is 0 (temperature 1)."""

SCHEDULES = ("constant", "linear_warmup")
"""Loss-weight schedules of :func:`loss_weight`."""


# --- 1. embeddings ----------------------------------------------------------------------------------------------------
def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``hidden`` ``[B, T, D]``, ``mask`` ``[B, T]`` (1 = pooled) -> ``[B, D]``: the mean over the masked positions
    (a row with no masked position gives zeros). The same pooling as ``evals.vlm.mean_pool``.

    >>> h = torch.tensor([[[1.0, 0.0], [3.0, 2.0], [9.0, 9.0]]])
    >>> mean_pool(h, torch.tensor([[1, 1, 0]]))
    tensor([[2., 1.]])
    """
    m = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


def _check_pair(img: torch.Tensor, txt: torch.Tensor, positives: torch.Tensor | None = None) -> None:
    if img.dim() != 2 or img.shape != txt.shape:
        raise ValueError(f"expected image and text embeddings of the same shape [B, D] "
                         f"(got {tuple(img.shape)} and {tuple(txt.shape)})")
    if positives is not None:
        b = img.shape[0]
        if positives.shape != (b, b) or positives.dtype != torch.bool:
            raise ValueError(f"positives: expected a bool [B, B] = [{b}, {b}] matrix "
                             f"(got {positives.dtype} {tuple(positives.shape)})")
        if not bool(positives.any(1).all()) or not bool(positives.any(0).all()):
            raise ValueError("positives: every row and every column needs at least one True "
                             "(an image without a matching caption, or a caption without its image)")


# --- 2. contrastive losses --------------------------------------------------------------------------------------------
def _multi_positive_ce(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Mean over rows of ``-(1/|P_i|) sum_{j in P_i} log softmax(logits_i)_j``."""
    logp = torch.log_softmax(logits, dim=1)
    pos = positives.to(logp.dtype)
    per_row = -(logp * pos).sum(1) / pos.sum(1)
    return per_row.mean()


def infonce(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor,
            positives: torch.Tensor | None = None) -> torch.Tensor:
    """CLIP's symmetric InfoNCE (Radford et al. 2021, "Learning Transferable Visual Models From Natural Language
    Supervision", arXiv 2103.00020), in its multi-positive form.

    ``img``, ``txt`` ``[B, D]`` are L2-normalised; ``logits = exp(s) * img_n @ txt_n.T`` with ``s = logit_scale``
    clamped to ``[0, log 100]`` as CLIP does (temperature ``1/exp(s)`` between 0.01 and 1). The loss is the mean of
    the image->text cross-entropy (rows of ``logits``) and the text->image one (rows of ``logits.T``). With several
    positives per row (rows sharing a caption), each row's term is the average of ``-log softmax`` over its positives
    (the SupCon "L_out" form, Khosla et al. 2020, arXiv 2004.11362; the "multi-positive" CLIP variants). With one
    positive per row (``positives`` None or the identity) it is exactly CLIP's
    ``(cross_entropy(logits, arange(B)) + cross_entropy(logits.T, arange(B))) / 2``.

    >>> img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    >>> round(float(infonce(img, img, torch.tensor(0.0))), 4)       # = log(1 + e^-1): logits [[1, 0], [0, 1]]
    0.3133
    """
    _check_pair(img, txt, positives)
    if positives is None:
        positives = torch.eye(img.shape[0], dtype=torch.bool, device=img.device)
    img_n, txt_n = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
    scale = logit_scale.clamp(0.0, LOGIT_SCALE_MAX).exp()
    logits = scale * img_n @ txt_n.T
    return (_multi_positive_ce(logits, positives) + _multi_positive_ce(logits.T, positives.T)) / 2


def siglip(img: torch.Tensor, txt: torch.Tensor, t_prime: torch.Tensor, bias: torch.Tensor,
           positives: torch.Tensor | None = None) -> torch.Tensor:
    """SigLIP's pairwise sigmoid loss (Zhai et al. 2023, "Sigmoid Loss for Language Image Pre-Training",
    arXiv 2303.15343)::

        logits_ij = exp(t') * <img_n_i, txt_n_j> + b
        z_ij      = +1 if positives[i, j] else -1
        loss      = -(1/B) * sum_ij log sigmoid(z_ij * logits_ij)

    (the paper's normalisation by the batch size |B|, not by B^2). ``positives`` None means the diagonal; with shared
    captions every pair of the same caption group is labelled +1. The paper initialises ``t' = log 10`` and
    ``b = -10``.

    >>> img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    >>> # logits = [[1, 0], [0, 1]] (t' = 0, b = 0): 2 * (softplus(-1) + softplus(0)) / 2 = 0.3133 + 0.6931
    >>> round(float(siglip(img, img, torch.tensor(0.0), torch.tensor(0.0))), 4)
    1.0064
    """
    _check_pair(img, txt, positives)
    if positives is None:
        positives = torch.eye(img.shape[0], dtype=torch.bool, device=img.device)
    img_n, txt_n = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
    logits = img_n @ txt_n.T * t_prime.exp() + bias
    z = positives.to(logits.dtype) * 2 - 1
    return -F.logsigmoid(z * logits).sum() / img.shape[0]


# --- 3. geometry against the modality gap -----------------------------------------------------------------------------
def alignment(img: torch.Tensor, txt: torch.Tensor, alpha: float = 2.0) -> torch.Tensor:
    """Wang & Isola's alignment (arXiv 2005.10242), ``mean_i ||img_n_i - txt_n_i||^alpha`` over the positive pairs
    ``(img_i, txt_i)`` (row ``i``'s image and its own caption), on L2-normalised embeddings. Fahim et al. (arXiv
    2405.18570) add it to CLIP's loss to close the contrastive gap. In ``[0, 2^alpha]``; lower is better.

    >>> round(float(alignment(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 3.0]]))), 4)   # |(1, -1)|^2
    2.0
    """
    _check_pair(img, txt)
    if alpha <= 0:
        raise ValueError(f"alignment: alpha must be > 0 (got {alpha})")
    diff = F.normalize(img, dim=-1) - F.normalize(txt, dim=-1)
    if alpha == 2:
        return diff.pow(2).sum(-1).mean()  # no sqrt: a smooth gradient where a pair already coincides
    return diff.norm(dim=-1).pow(alpha).mean()


def uniformity(x: torch.Tensor, t: float = 2.0) -> torch.Tensor:
    """Wang & Isola's uniformity (arXiv 2005.10242), ``log mean_{i<j} exp(-t ||x_n_i - x_n_j||^2)`` over the
    distinct pairs of the L2-normalised rows of ``x`` ``[N, D]`` (N >= 2). Lower is more uniform; the minimum is
    reached when the points spread evenly over the sphere. For the modality gap (Fahim et al., arXiv 2405.18570) pass
    the union of both modalities, ``torch.cat([img, txt])``, so the term also pushes images and captions apart from
    each other's clusters.

    >>> # two antipodal points: ||x_0 - x_1||^2 = 4 -> log exp(-2 * 4) = -8
    >>> round(float(uniformity(torch.tensor([[1.0, 0.0], [-2.0, 0.0]]))), 4)
    -8.0
    """
    if x.dim() != 2 or x.shape[0] < 2:
        raise ValueError(f"uniformity: expected [N, D] with N >= 2 (got {tuple(x.shape)})")
    if t <= 0:
        raise ValueError(f"uniformity: t must be > 0 (got {t})")
    x_n = F.normalize(x, dim=-1)
    sq = (2 - 2 * x_n @ x_n.T).clamp_min(0.0)  # ||a - b||^2 of unit vectors; no sqrt, so no NaN gradient at 0
    i, j = torch.triu_indices(x.shape[0], x.shape[0], offset=1, device=x.device)
    d = sq[i, j]
    return torch.logsumexp(-t * d, dim=0) - math.log(d.numel())


def centroid_gap(img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
    """The modality gap of Liang et al. 2022 ("Mind the Gap", arXiv 2203.02053) squared: ``||mean_i img_n_i -
    mean_i txt_n_i||^2``, the squared distance between the centroids of the L2-normalised embeddings. In ``[0, 4]``.

    >>> round(float(centroid_gap(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[-1.0, 0.0], [0.0, -5.0]]))), 4)
    2.0
    """
    if img.dim() != 2 or txt.dim() != 2 or img.shape[1] != txt.shape[1]:
        raise ValueError(f"centroid_gap: expected [N, D] and [M, D] (got {tuple(img.shape)} and {tuple(txt.shape)})")
    gap = F.normalize(img, dim=-1).mean(0) - F.normalize(txt, dim=-1).mean(0)
    return gap.pow(2).sum()


# --- 4. data: break the question-only prior ---------------------------------------------------------------------------
def balance_answers(records: list[dict[str, Any]], seed: int) -> list[dict[str, Any]]:
    """Answer-balanced multiple-choice records, after Goyal et al. 2017 ("Making the V in VQA Matter", arXiv
    1612.00837), whose balanced pairs give each question two images with different answers so the question alone
    cannot decide.

    Multiple-choice records (non-empty ``choices``) are grouped by their exact ``question`` text. Within a group every
    answer present is oversampled (uniform draws with replacement from that answer's records, by
    ``random.Random(seed)``) up to the count of the group's most frequent answer, so each answer occurs equally often.
    No record is dropped. Caption records (``choices == []``) pass through unchanged.

    Returns a new list: every input record (as a shallow copy, in input order), then the added copies, group by group
    in order of first appearance. An added copy keeps every field but gets a unique ``id``
    (``"<id>~balance<k>"``, ``k`` counting from 1 over the whole output). The input is not modified.

    >>> rs = [{"id": str(i), "question": "odd?", "answer": a, "choices": ["yes", "no"]} for i, a in enumerate("yyyn")]
    >>> [(r["id"], r["answer"]) for r in balance_answers(rs, seed=0)]
    [('0', 'y'), ('1', 'y'), ('2', 'y'), ('3', 'n'), ('3~balance1', 'n'), ('3~balance2', 'n')]
    """
    rng = random.Random(seed)
    groups: dict[str, dict[str, list[int]]] = {}
    for i, r in enumerate(records):
        if r.get("choices"):
            groups.setdefault(str(r["question"]), {}).setdefault(str(r["answer"]), []).append(i)
    out = [dict(r) for r in records]
    k = 0
    for by_answer in groups.values():
        most = max(len(idx) for idx in by_answer.values())
        for idx in by_answer.values():
            for _ in range(most - len(idx)):
                k += 1
                copy = dict(records[rng.choice(idx)])
                copy["id"] = f"{copy.get('id', '')}~balance{k}"
                out.append(copy)
    return out


# --- 5. schedule ------------------------------------------------------------------------------------------------------
def loss_weight(weight: float, schedule: str, warmup_fraction: float, progress: float) -> float:
    """The weight of the auxiliary losses at ``progress`` (fraction of the run done, in [0, 1]): ``constant`` gives
    ``weight``; ``linear_warmup`` ramps linearly from 0 at progress 0 to ``weight`` at ``warmup_fraction``, then stays
    (``warmup_fraction`` 0 means no ramp).

    >>> [loss_weight(2.0, "constant", 0.5, p) for p in (0.0, 0.25, 0.9)]
    [2.0, 2.0, 2.0]
    >>> [loss_weight(2.0, "linear_warmup", 0.5, p) for p in (0.0, 0.25, 0.9)]
    [0.0, 1.0, 2.0]
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule: expected one of {', '.join(SCHEDULES)} (got {schedule!r})")
    if not 0.0 <= warmup_fraction <= 1.0:
        raise ValueError(f"warmup_fraction: expected a number in [0, 1] (got {warmup_fraction!r})")
    if schedule == "constant" or warmup_fraction == 0.0:
        return float(weight)
    return float(weight) * min(1.0, max(0.0, float(progress)) / warmup_fraction)
