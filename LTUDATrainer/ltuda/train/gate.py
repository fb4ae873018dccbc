"""Per-organ switch for the pseudo-label term, by the teacher's learning status on that organ.

A young teacher calls the organs it cannot see yet "background" on every case that does not label
them, and those pseudo-negatives outvote the organ's own labels (the pancreas collapses). FlexMatch
and COSST let each class join the unlabelled loss only once the model has learnt it. Here the status
is the teacher's Dice on the organ where the truth is known: the weak views of the cases that label
it, which the teacher predicts anyway to make pseudo-labels, so it costs nothing. Until an organ's
running Dice reaches the threshold, its pseudo-label channel is ignored on cases that do not label it
(for that organ, labelled-only training); above it, the teacher's positives and negatives are used.

A second threshold does the same for the Dice term on pseudo-targets alone: its gradient scales with
1/organ size, so a teacher's misses cost far more there than under pBCE, while the teacher's
negatives (which pBCE keeps) are what stops an organ from spreading.

The training batches flatter the teacher: they are the cases the student (and so the EMA teacher)
learns from. With `held_out`, the teacher is judged instead on the held-out validation cases, at each
validation (`set_held_out`), where its Dice is what it will score on the cases that get its
pseudo-labels; between validations the gate keeps the last verdict.
"""

import torch


class OrganGate:
    def __init__(self, num_classes: int, threshold: float, momentum: float = 0.98, dice_threshold: float = 0.0,
                 held_out: bool = False):
        self.threshold, self.momentum, self.dice_threshold = float(threshold), float(momentum), float(dice_threshold)
        self.held_out = bool(held_out)
        self.overlap = torch.zeros(num_classes)
        self.total = torch.zeros(num_classes)
        self.held_out_dice = torch.zeros(num_classes)  # closed until the first validation says otherwise
        self.reduce = None  # distributed training: sums the batch counts over all ranks (distributed.py)

    @property
    def enabled(self) -> bool:
        """Whether the teacher's Dice is tracked at all (either threshold in use)."""
        return self.threshold > 0 or self.dice_threshold > 0

    def dice(self) -> torch.Tensor:
        """Teacher Dice per organ: on the held-out cases at the last validation (`held_out`), else the
        running Dice on the training batches (0 before the organ was ever seen)."""
        if self.held_out:
            return self.held_out_dice.clone()
        return torch.where(self.total > 0, 2 * self.overlap / self.total.clamp(min=1e-6), torch.zeros_like(self.total))

    def open(self) -> torch.Tensor:
        """Bool [C]: organs whose pseudo-labels are used (all of them when the gate is off)."""
        return self.dice() >= self.threshold  # a Dice is never below 0: threshold 0 opens every organ

    def dice_open(self) -> torch.Tensor:
        """Bool [C]: organs whose pseudo-targets also get the Dice term."""
        return self.dice() >= self.dice_threshold

    @torch.no_grad()
    def update(self, predicted: torch.Tensor, labels: torch.Tensor, labeled: torch.Tensor):
        """predicted, labels: class values [B, H, W]; labeled: [B, C] bool. Pools the batch's overlap and
        sizes per organ over the samples that label it, then folds them into the running sums."""
        if self.held_out:
            return  # judged at validation instead
        organs = torch.arange(1, labeled.shape[1] + 1, device=labels.device)[None, :, None, None]
        pred = (predicted[:, None] == organs) & labeled[:, :, None, None]
        truth = (labels[:, None] == organs) & labeled[:, :, None, None]
        overlap = (pred & truth).sum(dim=(0, 2, 3)).float().cpu()
        total = (pred.sum(dim=(0, 2, 3)) + truth.sum(dim=(0, 2, 3))).float().cpu()
        seen = labeled.any(dim=0).cpu()
        if self.reduce is not None:  # every rank folds in the same, global-batch counts
            n = len(overlap)
            pooled = self.reduce(torch.cat([overlap, total, seen.float()]))
            overlap, total, seen = pooled[:n], pooled[n:2 * n], pooled[2 * n:] > 0
        m = self.momentum
        self.overlap = torch.where(seen, m * self.overlap + (1 - m) * overlap, self.overlap)
        self.total = torch.where(seen, m * self.total + (1 - m) * total, self.total)

    def set_held_out(self, dice: torch.Tensor):
        """The teacher's Dice per organ [C] on the held-out cases (0 for an organ none of them labels)."""
        self.held_out_dice = torch.as_tensor(dice, dtype=torch.float32).detach().cpu().clone()

    def state_dict(self) -> dict:
        return {"overlap": self.overlap.clone(), "total": self.total.clone(),
                "held_out_dice": self.held_out_dice.clone()}

    def load_state_dict(self, state: dict):
        self.overlap, self.total = state["overlap"].clone(), state["total"].clone()
        # checkpoints from before the held-out gate: closed until the next validation
        self.held_out_dice = state.get("held_out_dice", torch.zeros_like(self.total)).clone()
