"""A training step written the way the reference implementation works, for side-by-side timing only.

Per-sample augmentation in Python loops on the CPU, float32, and one backbone pass per view and per
head (five student forward passes per stage-2 iteration), prototype updates in a loop over classes.
Same network, batch, losses and hyper-parameters as ours, so the throughput ratio isolates the
engineering differences. Not used for training.
"""

import math

import torch
import torch.nn.functional as F

from ltuda.losses import onehot_target, partial_bce, partial_target, prototype_loss
from ltuda.model.network import linear_hard_label


def _weak_one(image, label, config):
    """One sample at a time, as a per-sample dataset transform would do."""
    scale = float(torch.empty(1).uniform_(*config.scale_range)) if torch.rand(1) < 0.5 else 1.0
    angle = float(torch.empty(1).uniform_(-config.rotation_deg, config.rotation_deg)) if torch.rand(1) < 0.5 else 0.0
    rad = math.radians(angle)
    theta = torch.tensor([[math.cos(rad) / scale, -math.sin(rad) / scale, 0.0],
                          [math.sin(rad) / scale, math.cos(rad) / scale, 0.0]], device=image.device)[None]
    grid = F.affine_grid(theta, [1, 1] + list(image.shape[-2:]), align_corners=False)
    image = F.grid_sample(image[None] + 1, grid, align_corners=False)[0] - 1
    label = F.grid_sample(label[None, None].float(), grid, mode="nearest", align_corners=False)[0, 0].long()
    return image, label


def _cutmix_one(batch_list, i, box):
    top, left, h, w = box
    j = (i + 1) % len(batch_list)
    out = batch_list[i].clone()
    out[..., top:top + h, left:left + w] = batch_list[j][..., top:top + h, left:left + w]
    return out


def _random_box(height, width):
    area = float(torch.empty(1).uniform_(0.02, 0.4)) * height * width
    ratio = float(torch.empty(1).uniform_(0.3, 1 / 0.3))
    h = max(1, min(height, int(round(math.sqrt(area * ratio)))))
    w = max(1, min(width, int(round(math.sqrt(area / ratio)))))
    return int(torch.randint(0, height - h + 1, (1,))), int(torch.randint(0, width - w + 1, (1,))), h, w


def _sinkhorn_loop(scores, iterations=3, epsilon=0.05):
    q = torch.exp(scores / epsilon).t()
    q /= q.sum()
    k, b = q.shape
    for _ in range(iterations):
        q /= q.sum(dim=1, keepdim=True)
        q /= k
        q /= q.sum(dim=0, keepdim=True)
        q /= b
    return (q * b).t()


def _prototype_loop(net, bank_name, embedding, logits, similarity, target, config):
    """ProtoSeg-style: a Python loop over classes, one Sinkhorn per class."""
    bank = getattr(net, bank_name)
    m = bank.shape[1]
    pixels = embedding.permute(0, 2, 3, 1).reshape(-1, embedding.shape[1]).detach()
    flat = target.reshape(-1)
    correct = (logits.argmax(1) == target).reshape(-1)
    index = torch.zeros_like(flat)
    sims = similarity.permute(0, 3, 4, 1, 2).reshape(-1, bank.shape[0], m).detach()
    for k in range(bank.shape[0]):
        sel = flat == k
        if not sel.any():
            continue
        q = _sinkhorn_loop(sims[sel, k], config.sinkhorn_iterations, config.sinkhorn_epsilon)
        index[sel] = q.argmax(1)
        w = q * correct[sel].float()[:, None]
        f = w.t() @ pixels[sel]
        mass = w.sum(0)
        with torch.no_grad():
            for j in range(m):
                if mass[j] > 0:
                    bank[k, j] = F.normalize(config.prototype_momentum * bank[k, j]
                                             + (1 - config.prototype_momentum) * F.normalize(f[j], dim=0), dim=0)
    return prototype_loss(logits, similarity, target, index.view_as(target), config.ppc_weight, config.ppd_weight)


def reference_step(config, num_classes, student, teacher, batch, stage):
    images, labels, labeled = batch
    b = images.shape[0]
    views = [_weak_one(images[i], labels[i], config) for i in range(b)]
    images = torch.stack([v[0] for v in views])
    labels = torch.stack([v[1] for v in views])
    partial = partial_target(labels, labeled, num_classes)
    with torch.no_grad():
        hard = linear_hard_label(teacher(images, heads=("linear",))["linear"])
    pseudo = hard.clone()
    for i in range(b):  # per-sample masking, as a loop
        for c in range(num_classes):
            if labeled[i, c]:
                pseudo[i][hard[i] == c + 1] = 0
        pseudo[i][labels[i] > 0] = labels[i][labels[i] > 0]
    loss = partial_bce(student(images, heads=("linear",))["linear"], partial)
    for _ in range(config.strong_views):
        boxes = [_random_box(*images.shape[-2:]) for _ in range(b)]
        mix = lambda t: torch.stack([_cutmix_one(list(t), i, boxes[i]) for i in range(b)])  # noqa: E731
        s_img, s_partial, s_pseudo = mix(images), mix(partial), mix(pseudo)
        logits = student(s_img, heads=("linear",))["linear"]  # backbone pass for the linear head
        loss = loss + partial_bce(logits, onehot_target(s_pseudo, num_classes))
        if stage == 1:
            loss = loss + partial_bce(logits, s_partial)
        else:
            out = student(s_img)  # and again for the prototype heads
            for head, bank in (("proto-labeled", "prototypes_labeled"), ("proto-unlabeled", "prototypes_unlabeled")):
                loss = loss + _prototype_loop(student, bank, out["embedding"], out[head], out[head + "-similarity"],
                                              s_pseudo, config)
    return loss
