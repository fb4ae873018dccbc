"""The LTUDA network: a 2D U-Net backbone (MONAI BasicUNet) shared by three heads.

- linear head: 1x1 conv -> C sigmoid logits (threshold rule: best organ if its probability >= 0.5);
- projection head: 1x1 conv -> BN -> ReLU -> 1x1 conv, L2-normalise, LayerNorm, L2-normalise;
- two prototype banks (labelled, unlabelled), (C+1) classes x M prototypes x D, updated without
  gradients; a prototype classifier scores each class by its most similar prototype.
One backbone pass serves every head, so a training step never recomputes the U-Net per head.
"""

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.nets import BasicUNet

HEADS = ("linear", "proto-labeled", "proto-unlabeled")


@dataclass
class NetworkConfig:
    num_classes: int
    features: tuple = (32, 32, 64, 128, 256, 64)
    embedding_dim: int = 64
    prototypes_per_class: int = 5

    def to_json(self) -> dict:
        doc = asdict(self)
        doc["features"] = list(self.features)
        doc["name"] = "BasicUNet-2D"
        return doc

    @classmethod
    def from_json(cls, doc: dict) -> "NetworkConfig":
        return cls(int(doc["num_classes"]), tuple(doc["features"]), int(doc["embedding_dim"]),
                   int(doc["prototypes_per_class"]))


class LTUDANet(nn.Module):
    def __init__(self, config: NetworkConfig):
        super().__init__()
        self.config = config
        c, feat, dim, m = config.num_classes, config.features[-1], config.embedding_dim, config.prototypes_per_class
        self.backbone = BasicUNet(spatial_dims=2, in_channels=1, out_channels=1, features=config.features)
        self.backbone.final_conv = nn.Identity()  # expose the last decoder feature map
        self.linear_head = nn.Conv2d(feat, c, kernel_size=1)
        self.projection = nn.Sequential(
            nn.Conv2d(feat, feat, 1), nn.BatchNorm2d(feat), nn.ReLU(inplace=True), nn.Conv2d(feat, dim, 1)
        )
        self.embedding_norm = nn.LayerNorm(dim)
        self.class_norm = nn.LayerNorm(c + 1)
        self.register_buffer("prototypes_labeled", F.normalize(torch.randn(c + 1, m, dim), dim=-1))
        self.register_buffer("prototypes_unlabeled", F.normalize(torch.randn(c + 1, m, dim), dim=-1))

    def embed(self, features: torch.Tensor) -> torch.Tensor:
        """Pixel embeddings [B, D, H, W], unit length."""
        z = F.normalize(self.projection(features), dim=1)
        z = self.embedding_norm(z.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return F.normalize(z, dim=1)

    def prototype_scores(self, embedding: torch.Tensor, bank: torch.Tensor):
        """(class logits [B, C+1, H, W], pixel-prototype similarities [B, C+1, M, H, W])."""
        # A copy, so updating the bank after this forward pass cannot disturb its backward pass.
        similarity = torch.einsum("bdhw,kmd->bkmhw", embedding, bank.detach().clone().to(embedding.dtype))
        best = similarity.amax(dim=2)
        logits = self.class_norm(best.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return logits, similarity

    def forward(self, images: torch.Tensor, heads=HEADS, prototype_from: int = 0) -> dict:
        """Logits of the requested heads; prototype heads only for images[prototype_from:].

        Training needs the prototype classifiers on the strong views only, so the weak view's
        embedding is never computed.
        """
        features = self.backbone(images)
        out = {"linear": self.linear_head(features)}
        if any(h.startswith("proto") for h in heads):
            embedding = self.embed(features[prototype_from:])
            out["embedding"] = embedding
            for head, bank in (("proto-labeled", self.prototypes_labeled), ("proto-unlabeled", self.prototypes_unlabeled)):
                if head in heads:
                    out[head], out[head + "-similarity"] = self.prototype_scores(embedding, bank)
        return out


def linear_hard_label(logits: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """The paper's linear threshold rule: most probable organ, background if its probability < 0.5."""
    probs = torch.sigmoid(logits.float())
    best, index = probs.max(dim=1)
    return torch.where(best >= threshold, index + 1, torch.zeros_like(index))


def class_probabilities(out: dict, head: str) -> torch.Tensor:
    """Per-class scores [B, C+1, H, W] (background first) for any head, ready to resize and argmax.

    For the linear head the background score is 0.5, so argmax reproduces the threshold rule.
    """
    if head == "linear":
        organs = torch.sigmoid(out["linear"].float())
        background = torch.full_like(organs[:, :1], 0.5)
        return torch.cat([background, organs], dim=1)
    return torch.softmax(out[head].float(), dim=1)
