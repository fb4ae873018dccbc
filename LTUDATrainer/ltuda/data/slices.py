"""Training slices from the union of partially labelled cases, sampled as shuffled batches."""

import numpy as np
import torch

from .preprocess import foreground_slice_range


class SlicePool:
    """All training slices in memory (float16 images, uint8 labels) with each slice's labelled classes.

    Batches are drawn uniformly over the union of cases, so one batch mixes partial datasets: the
    precondition of cross-set CutMix.
    """

    def __init__(self, prepared_cases, num_classes: int, device="cpu"):
        images, labels, labeled = [], [], []
        for case in prepared_cases:
            start, stop = foreground_slice_range(np.asarray(case.labels))
            images.append(torch.from_numpy(np.array(case.image[start:stop])))
            labels.append(torch.from_numpy(np.array(case.labels[start:stop])))
            mask = torch.zeros(num_classes, dtype=torch.bool)
            for value in case.labeled:
                mask[value - 1] = True
            labeled.append(mask.expand(stop - start, num_classes))
        self.images = torch.cat(images).to(device)
        self.labels = torch.cat(labels).to(device)
        self.labeled = torch.cat(labeled).to(device)
        self.device = device

    def __len__(self):
        return self.images.shape[0]

    def batch(self, size: int, generator: torch.Generator):
        index = torch.randint(len(self), (size,), generator=generator).to(self.device)
        return (
            self.images[index].float().unsqueeze(1),
            self.labels[index].long(),
            self.labeled[index],
        )
