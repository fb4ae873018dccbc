"""The LTUDA network: a 2D U-Net backbone shared by three heads.

Backbones: MONAI BasicUNet (instance norm, LeakyReLU, transposed convolutions), or the reference
code's U-Net ("reference-unet": 64-128-256-512-512, BatchNorm, ReLU, bilinear up-sampling, ~13.4 M
parameters). Either way the heads read the last decoder feature map.

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
BACKBONES = ("basic-unet", "reference-unet")
REFERENCE_UNET_FEATURES = (64, 128, 256, 512, 512, 64)


@dataclass
class NetworkConfig:
    num_classes: int
    features: tuple = (32, 32, 64, 128, 256, 64)
    embedding_dim: int = 64
    prototypes_per_class: int = 5
    backbone: str = "basic-unet"

    def to_json(self) -> dict:
        doc = asdict(self)
        doc["features"] = list(self.features)
        doc["name"] = "BasicUNet-2D" if self.backbone == "basic-unet" else "ReferenceUNet-2D"
        return doc

    @classmethod
    def from_json(cls, doc: dict) -> "NetworkConfig":
        return cls(int(doc["num_classes"]), tuple(doc["features"]), int(doc["embedding_dim"]),
                   int(doc["prototypes_per_class"]), str(doc.get("backbone", "basic-unet")))


def _double_conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class ReferenceUNet(nn.Module):
    """The reference code's 2D U-Net, written from its description: encoder widths e0..e4 (a double
    conv each, max-pool between), four decoder levels that up-sample bilinearly, concatenate the
    skip and double-conv to e2, e1, e0, e0 channels. Returns the last decoder feature map."""

    def __init__(self, features=REFERENCE_UNET_FEATURES[:5]):
        super().__init__()
        e0, e1, e2, e3, e4 = features
        self.encoder = nn.ModuleList([_double_conv(1, e0), _double_conv(e0, e1), _double_conv(e1, e2),
                                      _double_conv(e2, e3), _double_conv(e3, e4)])
        self.decoder = nn.ModuleList([_double_conv(e4 + e3, e2), _double_conv(e2 + e2, e1),
                                      _double_conv(e1 + e1, e0), _double_conv(e0 + e0, e0)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for level, block in enumerate(self.encoder):
            x = block(F.max_pool2d(x, 2) if level else x)
            skips.append(x)
        for block, skip in zip(self.decoder, reversed(skips[:-1])):
            x = F.interpolate(x, size=skip.shape[2:], mode="bilinear", align_corners=True)
            x = block(torch.cat([skip, x], dim=1))
        return x


def make_backbone(config: NetworkConfig) -> nn.Module:
    if config.backbone == "reference-unet":
        return ReferenceUNet(tuple(config.features[:5]))
    if config.backbone != "basic-unet":
        raise ValueError(f"unknown backbone {config.backbone!r}; choose from {', '.join(BACKBONES)}")
    backbone = BasicUNet(spatial_dims=2, in_channels=1, out_channels=1, features=config.features)
    backbone.final_conv = nn.Identity()  # expose the last decoder feature map
    return backbone


class LTUDANet(nn.Module):
    def __init__(self, config: NetworkConfig):
        super().__init__()
        self.config = config
        c, dim, m = config.num_classes, config.embedding_dim, config.prototypes_per_class
        feat = config.features[0] if config.backbone == "reference-unet" else config.features[-1]
        self.backbone = make_backbone(config)
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
