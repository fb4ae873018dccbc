"""Training slices from the union of partially labelled cases, drawn as cross-dataset batches."""

import numpy as np
import torch

from .preprocess import foreground_slice_range


class SlicePool:
    """All training slices in memory (float16 images, uint8 labels) with each slice's labelled classes.

    Cases that label the same organs form one partial dataset. A batch takes its samples from the
    datasets in turn (in a random order), so neighbours i and i+1 come from different partial
    datasets whenever there are several: cross-set CutMix then always pastes a labelled organ of
    one set next to unlabelled organs of another, and a small dataset (few or thick slices) is not
    drowned out by a large one.
    """

    def __init__(self, prepared_cases, num_classes: int, device="cpu", full_labels=None):
        """full_labels: optional, per case, the prepared case with every organ labelled; a batch then
        carries them as a fourth tensor (for the oracle benchmark row, never as training labels)."""
        images, labels, labeled, groups, full = [], [], [], [], []
        group_of = {}  # the organs a partial dataset labels -> its index
        for i, case in enumerate(prepared_cases):
            start, stop = foreground_slice_range(np.asarray(case.labels))
            images.append(torch.from_numpy(np.array(case.image[start:stop])))
            labels.append(torch.from_numpy(np.array(case.labels[start:stop])))
            if full_labels is not None:
                full.append(torch.from_numpy(np.array(full_labels[i].labels[start:stop])))
            mask = torch.zeros(num_classes, dtype=torch.bool)
            for value in case.labeled:
                mask[value - 1] = True
            labeled.append(mask.expand(stop - start, num_classes))
            group = group_of.setdefault(tuple(sorted(case.labeled)), len(group_of))
            groups.append(torch.full((stop - start,), group))
        self.images = torch.cat(images).to(device)
        self.labels = torch.cat(labels).to(device)
        self.labeled = torch.cat(labeled).to(device)
        self.full_labels = torch.cat(full).to(device) if full_labels is not None else None
        group_index = torch.cat(groups)
        self.members = [torch.nonzero(group_index == g).flatten() for g in range(len(group_of))]
        self.labelling = [g for key, g in group_of.items() if key]  # datasets that label some organ
        self.unlabelled = [g for key, g in group_of.items() if not key]  # at most one: the cases labelling nothing
        self.device = device

    def __len__(self):
        return self.images.shape[0]

    @property
    def num_datasets(self) -> int:
        return len(self.members)

    def batch(self, size: int, generator: torch.Generator, unlabelled: str = "added"):
        """`size` slices from the datasets in turn. unlabelled="added": the cases that label nothing take
        none of those places and add as many slices as one labelled dataset gets, after them; "in-batch":
        they are one more dataset in the turn, and take places the labelled sets would get. Without such
        cases both are the same draw."""
        if unlabelled == "added" and self.unlabelled and self.labelling:
            chosen = self._in_turn(self.labelling, size, generator)
            chosen += self._in_turn(self.unlabelled, max(1, size // len(self.labelling)), generator)
        else:
            chosen = self._in_turn(range(self.num_datasets), size, generator)
        index = torch.stack([
            self.members[g][torch.randint(len(self.members[g]), (1,), generator=generator)][0] for g in chosen
        ]).to(self.device)
        batch = (self.images[index].float().unsqueeze(1), self.labels[index].long(), self.labeled[index])
        if self.full_labels is not None:
            batch += (self.full_labels[index].long(),)
        return batch

    @staticmethod
    def _in_turn(datasets, count: int, generator: torch.Generator) -> list:
        """`count` of `datasets`, each once in a random order, then again in that order."""
        order = torch.randperm(len(datasets), generator=generator)
        return [datasets[order[i % len(datasets)]] for i in range(count)]
