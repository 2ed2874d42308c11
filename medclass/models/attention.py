"""Attention family: SE-ResNet-50, CBAM ResNet-18, a small ViT and gated attention-MIL.

SE and CBAM re-weight channels / positions inside a CNN (Grad-CAM still applies);
the ViT and attention-MIL explain themselves with attention weights through
``attention_map(x)``, a ``(B, *spatial)`` map in ``[0, 1]`` on the input's grid.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.networks import nets
from monai.networks.layers.factories import Conv, Norm, Pool
from monai.networks.nets.resnet import ResNetBlock
from torch import nn

from medclass.errors import MedClassError
from medclass.models.cnn import MonaiCNN
from medclass.models.registry import ClassifierModule, register_model
from medclass.models.rnn import ConvEncoder2d


def _scale01(m: torch.Tensor) -> torch.Tensor:
    """Min-max scale each sample of ``m`` to ``[0, 1]`` (a flat map becomes all zeros)."""
    flat = m.flatten(1)
    lo = flat.min(dim=1, keepdim=True).values
    hi = flat.max(dim=1, keepdim=True).values
    return ((flat - lo) / (hi - lo).clamp_min(1e-12)).reshape(m.shape)


# --------------------------------------------------------------------------- SE-ResNet-50


@register_model("seresnet50", "attention", description="SE-ResNet-50 (MONAI), squeeze-and-excitation channel attention")
def seresnet50(spatial_dims=2, in_channels=1, num_outputs=2, image_size=64, dropout: float = 0.2) -> MonaiCNN:
    body = nets.SEResNet50(spatial_dims=spatial_dims, in_channels=in_channels, num_classes=1, pretrained=False)
    features = body.last_linear.in_features
    body.last_linear = nn.Identity()
    return MonaiCNN(body, features, num_outputs, cam_layer="body.layer4", dropout=dropout)


# --------------------------------------------------------------------------- CBAM ResNet-18


class CBAM(nn.Module):
    """Convolutional block attention (Woo et al. 2018): channel, then spatial attention.

    Parameters
    ----------
    channels : int
        Channels of the feature map.
    spatial_dims : int
        2 or 3.
    reduction : int
        Bottleneck ratio of the channel MLP.
    """

    def __init__(self, channels: int, spatial_dims: int = 2, reduction: int = 16):
        super().__init__()
        conv = Conv[Conv.CONV, spatial_dims]
        hidden = max(channels // reduction, 4)
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, channels))
        self.spatial = conv(2, 1, 7, padding=3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = tuple(range(2, x.dim()))
        channel = torch.sigmoid(self.mlp(x.mean(dims)) + self.mlp(x.amax(dims)))
        x = x * channel.reshape(*channel.shape, *([1] * len(dims)))
        pooled = torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.spatial(pooled))


def basic_block(cin: int, cout: int, stride: int, spatial_dims: int) -> ResNetBlock:
    """MONAI's ResNet basic block (two 3x3 convolutions with a shortcut), 2D or 3D.

    A non-inplace ReLU: Grad-CAM's backward hooks refuse outputs modified in place.
    """
    conv, norm = Conv[Conv.CONV, spatial_dims], Norm[Norm.BATCH, spatial_dims]
    down = (nn.Sequential(conv(cin, cout, 1, stride=stride, bias=False), norm(cout))
            if stride != 1 or cin != cout else None)
    return ResNetBlock(cin, cout, spatial_dims=spatial_dims, stride=stride, downsample=down,
                       act=("relu", {"inplace": False}))


class CBAMResNet(ClassifierModule):
    """ResNet-18 layout (2 basic blocks per stage) with CBAM after each stage.

    Parameters
    ----------
    spatial_dims, in_channels, num_outputs : int
        As in :func:`~medclass.models.registry.create_model`.
    width : int
        Channels of the first stage, doubled at each of the four stages. 64 is the
        original ResNet-18 (11 M parameters); the default 32 is four times smaller,
        which is what trains in minutes on a CPU at 64 px.
    dropout : float
        Dropout before the head.
    """

    def __init__(self, spatial_dims: int, in_channels: int, num_outputs: int, width: int = 32,
                 dropout: float = 0.2):
        super().__init__()
        conv, norm = Conv[Conv.CONV, spatial_dims], Norm[Norm.BATCH, spatial_dims]
        # A strided 3x3 stem instead of 7x7 + max-pool: at 64 px the original stem
        # would leave a 2 x 2 map for layer4.
        self.stem = nn.Sequential(conv(in_channels, width, 3, stride=2, padding=1, bias=False), norm(width),
                                  nn.ReLU(inplace=True))
        stages = []
        cin = width
        for i in range(4):
            cout = width * 2**i
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(basic_block(cin, cout, stride, spatial_dims),
                                        basic_block(cout, cout, 1, spatial_dims), CBAM(cout, spatial_dims)))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(cin, num_outputs)
        self.pool = Pool[Pool.ADAPTIVEAVG, spatial_dims](1)
        self.cam_layer = "layer4"

    def forward_features(self, x, **extra):
        x = self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))
        # Adaptive pooling keeps the gradient at layer4 contiguous, as MONAI's GradCAM needs.
        return self.dropout(self.pool(x).flatten(1))


@register_model("cbam-resnet18", "attention", description="ResNet-18 layout (width 32) with CBAM after each stage")
def cbam_resnet18(spatial_dims=2, in_channels=1, num_outputs=2, image_size=64, width: int = 32,
                  dropout: float = 0.2) -> CBAMResNet:
    return CBAMResNet(spatial_dims, in_channels, num_outputs, width, dropout)


# --------------------------------------------------------------------------- ViT


class ViTClassifier(ClassifierModule):
    """MONAI's ViT encoder, mean-pooled tokens, shared head.

    Parameters
    ----------
    spatial_dims, in_channels, num_outputs : int
        As in :func:`~medclass.models.registry.create_model`.
    img_size, patch_size : tuple of int
        Input and patch shape; each side of ``img_size`` must be a multiple of the patch's.
    hidden, mlp, layers, heads : int
        Transformer size (the defaults of the builder are a ViT-Tiny-like model for 64 px).
    dropout : float
        Dropout before the head.
    """

    def __init__(self, spatial_dims: int, in_channels: int, num_outputs: int, img_size: tuple[int, ...],
                 patch_size: tuple[int, ...], hidden: int = 192, mlp: int = 384, layers: int = 4,
                 heads: int = 3, dropout: float = 0.2):
        super().__init__()
        for side, patch in zip(img_size, patch_size):
            if side % patch:
                raise MedClassError(
                    f"ViT input {img_size} is not a multiple of its patch {patch_size}",
                    "choose an image_size (and slices for 3D) divisible by patch_size",
                )
        self.vit = nets.ViT(in_channels=in_channels, img_size=img_size, patch_size=patch_size, hidden_size=hidden,
                            mlp_dim=mlp, num_layers=layers, num_heads=heads, spatial_dims=spatial_dims,
                            save_attn=True)
        self.grid = tuple(s // p for s, p in zip(img_size, patch_size))
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, num_outputs)
        self.cam_layer = None

    def forward_features(self, x, **extra):
        tokens, _ = self.vit(x)
        return self.dropout(tokens.mean(dim=1))

    @torch.no_grad()
    def attention_map(self, x: torch.Tensor) -> torch.Tensor:
        """Attention the patches receive in the last block, on the input's grid.

        There is no CLS token (the features are the mean token), so each patch's
        weight is the attention it receives, averaged over heads and query tokens.

        Returns
        -------
        torch.Tensor
            ``(B, *spatial)`` in ``[0, 1]``.
        """
        self.vit(x)
        att = self.vit.blocks[-1].attn.att_mat  # (B, heads, N, N)
        received = att.mean(dim=(1, 2)).reshape(x.shape[0], 1, *self.grid)
        mode = "bilinear" if len(self.grid) == 2 else "trilinear"
        up = F.interpolate(received, size=tuple(x.shape[2:]), mode=mode, align_corners=False)[:, 0]
        return _scale01(up)


@register_model("vit", "attention", description="small ViT (MONAI; patch 8, hidden 192, 4 layers, 3 heads)")
def vit(spatial_dims=2, in_channels=1, num_outputs=2, image_size=64, slices: int | None = None,
        patch_size: int = 8, dropout: float = 0.2, hidden: int = 192, mlp: int = 384, layers: int = 4,
        heads: int = 3) -> ViTClassifier:
    """Build the ViT; ``slices`` is the depth of a 3D input (default ``image_size``: a cube)."""
    if spatial_dims == 2:
        img, patch = (image_size, image_size), (patch_size, patch_size)
    else:
        d = slices or image_size
        # Volumes are often thin (a few slices): a shallower patch along depth keeps tokens.
        img, patch = (d, image_size, image_size), (min(patch_size // 2, d) or 1, patch_size, patch_size)
    return ViTClassifier(spatial_dims, in_channels, num_outputs, img, patch, hidden=hidden, mlp=mlp, layers=layers,
                         heads=heads, dropout=dropout)


# --------------------------------------------------------------------------- attention-MIL


class GatedAttentionMIL(ClassifierModule):
    """Gated attention multiple-instance pooling (Ilse et al. 2018).

    ``a_k = softmax_k(w^T (tanh(V h_k) * sigmoid(U h_k)))``, bag embedding ``sum_k a_k h_k``.
    A 3D input ``(B, C, S, H, W)`` is a bag of ``S`` slices / views; a 2D input
    ``(B, C, H, W)`` is a bag of ``grid x grid`` non-overlapping tiles.

    Parameters
    ----------
    in_channels, num_outputs : int
        As in :func:`~medclass.models.registry.create_model`.
    grid : int
        Tiles per side for a 2D input.
    attention_dim : int
        Width ``L`` of the gated attention.
    dropout : float
        Dropout before the head.
    """

    def __init__(self, in_channels: int, num_outputs: int, grid: int = 4, attention_dim: int = 128,
                 dropout: float = 0.2):
        super().__init__()
        self.grid = grid
        self.encoder = ConvEncoder2d(in_channels)
        f = self.encoder.out_features
        self.attention_v = nn.Linear(f, attention_dim)
        self.attention_u = nn.Linear(f, attention_dim)
        self.attention_w = nn.Linear(attention_dim, 1)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(f, num_outputs)
        # Grad-CAM would see one activation per tile, not per image: the model
        # explains itself through attention_map instead.
        self.cam_layer = None
        self.last_attention: torch.Tensor | None = None

    def instances(self, x: torch.Tensor) -> torch.Tensor:
        """The ``(B, K, C, h, w)`` bag of a batch: slices for 3D, tiles for 2D."""
        if x.dim() == 5:
            return x.transpose(1, 2)
        b, c, h, w = x.shape
        g = self.grid
        th, tw = h // g, w // g
        if th == 0 or tw == 0:
            raise MedClassError(f"image {h}x{w} is too small for a {g}x{g} tile grid", "use a smaller grid")
        # (B, C, g, th, g, tw) -> (B, g*g, C, th, tw); any remainder rows/columns are dropped.
        tiles = x[:, :, : th * g, : tw * g].reshape(b, c, g, th, g, tw)
        return tiles.permute(0, 2, 4, 1, 3, 5).reshape(b, g * g, c, th, tw)

    def forward_features(self, x, **extra):
        bag = self.instances(x)
        b, k = bag.shape[:2]
        h = self.encoder(bag.reshape(b * k, *bag.shape[2:])).mean(dim=(2, 3)).reshape(b, k, -1)
        scores = self.attention_w(torch.tanh(self.attention_v(h)) * torch.sigmoid(self.attention_u(h)))
        a = torch.softmax(scores.squeeze(-1), dim=1)
        self.last_attention = a.detach()
        return self.dropout((a.unsqueeze(-1) * h).sum(dim=1))

    @torch.no_grad()
    def attention_map(self, x: torch.Tensor) -> torch.Tensor:
        """Instance weights painted back on the input: per tile (2D) or per slice (3D).

        Weights are divided by each bag's largest, so the instance the decision rests on
        most is 1 and a uniform bag is all ones.

        Returns
        -------
        torch.Tensor
            ``(B, *spatial)`` in ``[0, 1]``.
        """
        self.forward_features(x)
        a = self.last_attention
        a = a / a.amax(dim=1, keepdim=True).clamp_min(1e-12)
        if x.dim() == 5:
            b, _, s, h, w = x.shape
            return a.reshape(b, s, 1, 1).expand(b, s, h, w).clone()
        b, _, h, w = x.shape
        g = self.grid
        tiles = a.reshape(b, 1, g, g)
        th, tw = h // g, w // g
        out = torch.zeros(b, h, w, dtype=a.dtype, device=a.device)
        # Pixels in a remainder strip belong to no tile and keep weight 0.
        out[:, : th * g, : tw * g] = F.interpolate(tiles, size=(th * g, tw * g), mode="nearest")[:, 0]
        return out


@register_model("attention-mil", "attention", input_kind="bag",
                description="gated attention-MIL over slices/views (3D) or 4x4 tiles (2D)")
def attention_mil(spatial_dims=2, in_channels=1, num_outputs=2, image_size=64, grid: int = 4,
                  dropout: float = 0.2) -> GatedAttentionMIL:
    return GatedAttentionMIL(in_channels, num_outputs, grid=grid, dropout=dropout)
