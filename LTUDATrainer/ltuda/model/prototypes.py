"""Prototype assignment (Sinkhorn-Knopp) and momentum updates, vectorised over every class at once.

Each pixel belongs to one class k (its target); within k it is softly assigned to k's M prototypes
so that the class's pixels spread evenly over them (ProtoSeg). All classes are solved together
with index_add over the class index instead of a Python loop per class or per prototype.
"""

import torch
import torch.nn.functional as F


def sinkhorn_assign(scores: torch.Tensor, classes: torch.Tensor, num_classes: int, iterations: int = 3,
                    epsilon: float = 0.05):
    """scores [N, M] (similarity of each pixel to its own class's prototypes), classes [N].

    Returns (soft assignment [N, M] with rows summing to 1, hard index [N]).
    """
    n, m = scores.shape
    # Similarities are cosines (<= 1): shifting by 1 keeps exp() in range without changing the result.
    q = torch.exp((scores.float() - 1.0) / epsilon)
    count = torch.bincount(classes, minlength=num_classes).float()  # pixels per class
    total = torch.zeros(num_classes, device=q.device).index_add_(0, classes, q.sum(dim=1))
    q = q / total[classes].clamp(min=1e-30)[:, None]
    for _ in range(iterations):
        per_prototype = torch.zeros(num_classes, m, device=q.device).index_add_(0, classes, q)
        q = q / per_prototype[classes].clamp(min=1e-30) / m
        q = q / q.sum(dim=1, keepdim=True).clamp(min=1e-30) / count[classes][:, None]
    q = q * count[classes][:, None]
    return q, q.argmax(dim=1)


@torch.no_grad()
def momentum_update(bank: torch.Tensor, embedding: torch.Tensor, classes: torch.Tensor, assignment: torch.Tensor,
                    use: torch.Tensor, momentum: float = 0.999, reduce=None) -> torch.Tensor:
    """New prototypes = L2-normalised assignment-weighted mean of the embeddings of `use` pixels.

    bank [K, M, D]; embedding [N, D]; classes [N]; assignment [N, M]; use [N] bool (pixels that may
    update this bank and that the classifier currently predicts correctly). Prototypes no pixel was
    assigned to keep their value. Returns the updated bank (re-normalised).
    reduce: in distributed training, sums a tensor over all ranks (Group.sum_): the sums and masses of
    every rank's pixels are combined before the momentum step, so all ranks' banks stay identical.
    """
    k, m, d = bank.shape
    weights = assignment.float() * use.float()[:, None]  # [N, M]
    columns = classes[:, None] * m + torch.arange(m, device=classes.device)[None]  # [N, M]
    scatter = torch.zeros(embedding.shape[0], k * m, device=embedding.device).scatter_(1, columns, weights)
    summed = scatter.t() @ embedding.float()  # [K*M, D]
    mass = scatter.sum(dim=0)
    if reduce is not None:  # one all-reduce for both
        pooled = reduce(torch.cat([summed, mass[:, None]], dim=1))
        summed, mass = pooled[:, :d], pooled[:, d]
    flat = bank.reshape(k * m, d).float()
    blended = F.normalize(momentum * flat + (1 - momentum) * F.normalize(summed, dim=1), dim=1)
    flat = torch.where((mass > 0)[:, None], blended, flat)
    return flat.reshape(k, m, d).to(bank.dtype)
