"""Cross-modal family: image + report/indication text + DICOM header fields.

``forward(x, text=None, tabular=None)``: ``text`` is a ``LongTensor (B, L)`` from
:func:`medclass.multimodal.tokenize` (0 = padding), ``tabular`` a ``FloatTensor (B, 4)``
from :func:`medclass.multimodal.encode_tabular` (NaN = missing). A missing modality (the
argument is ``None``, or a row is all padding / all NaN) is replaced by a learned
"missing" embedding, so one model serves image only, image+text, image+header and all
three; modality dropout in training teaches it to. With image only the model traces
(``torch.jit.trace``) and exports to ONNX, because the ``None`` checks are plain Python.
"""

from __future__ import annotations

import torch
from monai.networks import nets
from torch import nn

from medclass.models.registry import ClassifierModule, register_model
from medclass.multimodal import TABULAR_FIELDS


class TextEncoder(nn.Module):
    """Mean of hashed-token embeddings over the non-padding tokens, then a projection.

    A bag-of-words model (fastText-like): no vocabulary, no download, fast on a CPU.

    Parameters
    ----------
    buckets : int
        Hash space of :func:`~medclass.multimodal.tokenize` (embedding rows).
    dim : int
        Output width.
    """

    def __init__(self, buckets: int = 2**15, dim: int = 128):
        super().__init__()
        self.embedding = nn.Embedding(buckets, dim, padding_idx=0)
        self.proj = nn.Sequential(nn.Linear(dim, dim), nn.GELU())
        self.out_features = dim

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        mask = (tokens != 0).unsqueeze(-1).float()
        summed = (self.embedding(tokens) * mask).sum(dim=1)
        return self.proj(summed / mask.sum(dim=1).clamp_min(1.0))


class TabularEncoder(nn.Module):
    """MLP over header fields with NaN set to 0 and a missing-indicator per field."""

    def __init__(self, n_fields: int = len(TABULAR_FIELDS), dim: int = 64):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(2 * n_fields, dim), nn.ReLU(inplace=True), nn.Linear(dim, dim))
        self.out_features = dim

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        missing = torch.isnan(values)
        filled = torch.where(missing, torch.zeros_like(values), values)
        return self.mlp(torch.cat([filled, missing.float()], dim=1))


class CrossModalClassifier(ClassifierModule):
    """MONAI ResNet-18 image body + :class:`TextEncoder` + :class:`TabularEncoder`, fused.

    Parameters
    ----------
    spatial_dims, in_channels, num_outputs : int
        As in :func:`~medclass.models.registry.create_model`.
    fusion : {"concat", "xattn"}
        ``concat``: pooled image, text and header vectors side by side.
        ``xattn``: every image token of the layer4 map attends to the text token and the
        header token (residual, layer norm), then the tokens are mean-pooled.
    text_dim, tabular_dim, buckets : int
        Encoder sizes; ``buckets`` must match :func:`~medclass.multimodal.tokenize`.
    modality_dropout : float
        Probability, per sample and modality, of replacing text / header by the missing
        embedding during training.
    dropout : float
        Dropout before the head.
    """

    def __init__(self, spatial_dims: int, in_channels: int, num_outputs: int, fusion: str = "concat",
                 text_dim: int = 128, tabular_dim: int = 64, buckets: int = 2**15,
                 modality_dropout: float = 0.2, dropout: float = 0.2):
        super().__init__()
        if fusion not in ("concat", "xattn"):
            raise ValueError(f"fusion must be 'concat' or 'xattn', got {fusion!r}")
        self.fusion = fusion
        self.image = nets.resnet18(spatial_dims=spatial_dims, n_input_channels=in_channels, num_classes=1)
        self.image.fc = None
        image_dim = 512
        self.text = TextEncoder(buckets, text_dim)
        self.tabular = TabularEncoder(len(TABULAR_FIELDS), tabular_dim)
        self.missing_text = nn.Parameter(0.02 * torch.randn(text_dim))
        self.missing_tabular = nn.Parameter(0.02 * torch.randn(tabular_dim))
        self.modality_dropout = modality_dropout
        if fusion == "concat":
            features = image_dim + text_dim + tabular_dim
        else:
            features = 256
            self.image_proj = nn.Linear(image_dim, features)
            self.text_proj = nn.Linear(text_dim, features)
            self.tabular_proj = nn.Linear(tabular_dim, features)
            self.cross_attention = nn.MultiheadAttention(features, num_heads=4, batch_first=True)
            self.norm = nn.LayerNorm(features)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(features, num_outputs)
        self.cam_layer = "image.layer4"

    def _image_map(self, x: torch.Tensor) -> torch.Tensor:
        m = self.image
        x = m.act(m.bn1(m.conv1(x)))
        if not m.no_max_pool:
            x = m.maxpool(x)
        return m.layer4(m.layer3(m.layer2(m.layer1(x))))

    def _with_missing(self, vec: torch.Tensor, present: torch.Tensor, missing: torch.Tensor) -> torch.Tensor:
        if self.training and self.modality_dropout > 0:
            keep = torch.rand(present.shape, device=present.device) >= self.modality_dropout
            present = present & keep
        return torch.where(present.unsqueeze(1), vec, missing.to(vec.dtype).expand_as(vec))

    def _side_inputs(self, x: torch.Tensor, text, tabular) -> tuple[torch.Tensor, torch.Tensor]:
        b = x.shape[0]
        if text is None:
            t = self.missing_text.to(x.dtype).expand(b, -1)
        else:
            t = self._with_missing(self.text(text), (text != 0).any(dim=1), self.missing_text)
        if tabular is None:
            h = self.missing_tabular.to(x.dtype).expand(b, -1)
        else:
            tabular = tabular.to(x.dtype)
            h = self._with_missing(self.tabular(tabular), ~torch.isnan(tabular).all(dim=1), self.missing_tabular)
        return t, h

    def forward_features(self, x, text=None, tabular=None, **extra):
        fmap = self._image_map(x)
        t, h = self._side_inputs(x, text, tabular)
        if self.fusion == "concat":
            # The body's adaptive pooling (not mean()) keeps layer4's gradient contiguous for GradCAM.
            fused = torch.cat([self.image.avgpool(fmap).flatten(1), t, h], dim=1)
        else:
            tokens = self.image_proj(fmap.flatten(2).transpose(1, 2))  # (B, N, d)
            context = torch.stack([self.text_proj(t), self.tabular_proj(h)], dim=1)  # (B, 2, d)
            attended, _ = self.cross_attention(tokens, context, context, need_weights=False)
            fused = self.norm(tokens + attended).mean(dim=1)
        return self.dropout(fused)

    def forward(self, x, text=None, tabular=None, **extra):
        return self.head(self.forward_features(x, text=text, tabular=tabular))


@register_model("fusion-resnet18", "crossmodal", input_kind="multimodal",
                description="ResNet-18 image + hashed-token text + header MLP, concat fusion")
def fusion_resnet18(spatial_dims=2, in_channels=1, num_outputs=2, image_size=64, text_dim: int = 128,
                    tabular_dim: int = 64, buckets: int = 2**15, modality_dropout: float = 0.2,
                    dropout: float = 0.2) -> CrossModalClassifier:
    return CrossModalClassifier(spatial_dims, in_channels, num_outputs, "concat", text_dim, tabular_dim, buckets,
                                modality_dropout, dropout)


@register_model("fusion-xattn", "crossmodal", input_kind="multimodal",
                description="ResNet-18 image tokens cross-attending to text and header tokens")
def fusion_xattn(spatial_dims=2, in_channels=1, num_outputs=2, image_size=64, text_dim: int = 128,
                 tabular_dim: int = 64, buckets: int = 2**15, modality_dropout: float = 0.2,
                 dropout: float = 0.2) -> CrossModalClassifier:
    return CrossModalClassifier(spatial_dims, in_channels, num_outputs, "xattn", text_dim, tabular_dim, buckets,
                                modality_dropout, dropout)
