"""RNN family: a 2D CNN encoder per slice / cine frame / view, then a bidirectional GRU or LSTM.

A 3D input ``(B, C, S, H, W)`` is read as a sequence of ``S`` 2D images (the slices of a
volume, the frames of an ultrasound cine, the four views of a mammography case): each is
encoded by the same small CNN, the bi-RNN reads the ``(B, S, F)`` sequence and attention
pooling over ``S`` gives the study embedding. A 2D input ``(B, C, H, W)`` is read CRNN
style: the encoder's feature map ``(B, F, h, w)`` becomes a sequence of ``h`` rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from medclass.models.registry import ClassifierModule, register_model


class ConvEncoder2d(nn.Module):
    """A compact 4-block 2D CNN (conv-BN-ReLU, max-pool after the first three blocks).

    Small enough to run once per slice on a CPU at 64 px; also the instance encoder of
    attention-MIL. The output map is ``image_size / 8`` on a side.

    Parameters
    ----------
    in_channels : int
        Image channels.
    widths : tuple of int
        Channels of the four blocks; ``out_features`` is the last one.
    """

    def __init__(self, in_channels: int, widths: tuple[int, ...] = (32, 64, 128, 256)):
        super().__init__()
        blocks = []
        prev = in_channels
        for i, w in enumerate(widths):
            layers: list[nn.Module] = [
                nn.Conv2d(prev, w, 3, padding=1, bias=False),
                nn.BatchNorm2d(w),
                nn.ReLU(inplace=True),
            ]
            # No pooling after the last block keeps a map (8 x 8 at 64 px) that Grad-CAM
            # can resolve and that gives the 2D CRNN a sequence of useful length.
            if i < len(widths) - 1:
                layers.append(nn.MaxPool2d(2))
            blocks.append(nn.Sequential(*layers))
            prev = w
        self.blocks = nn.Sequential(*blocks)
        self.out_features = prev

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class SequenceRNN(ClassifierModule):
    """Per-slice CNN encoder + bidirectional GRU/LSTM + attention pooling.

    Parameters
    ----------
    in_channels : int
        Image channels.
    num_outputs : int
        Number of logits.
    cell : {"gru", "lstm"}
        Recurrent cell.
    hidden : int
        Hidden size of each RNN direction.
    dropout : float
        Dropout before the head.
    """

    def __init__(self, in_channels: int, num_outputs: int, cell: str = "gru", hidden: int = 128,
                 dropout: float = 0.2):
        super().__init__()
        self.encoder = ConvEncoder2d(in_channels)
        rnn_cls = {"gru": nn.GRU, "lstm": nn.LSTM}[cell]
        self.rnn = rnn_cls(self.encoder.out_features, hidden, batch_first=True, bidirectional=True)
        self.attn = nn.Linear(2 * hidden, 1)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(2 * hidden, num_outputs)
        self.cam_layer = f"encoder.blocks.{len(self.encoder.blocks) - 1}"
        self.last_attention: torch.Tensor | None = None

    def sequence(self, x: torch.Tensor) -> torch.Tensor:
        """The ``(B, S, F)`` sequence the RNN reads: slices for 3D input, rows for 2D."""
        if x.dim() == 5:
            b, c, s, h, w = x.shape
            slices = x.transpose(1, 2).reshape(b * s, c, h, w)
            return self.encoder(slices).mean(dim=(2, 3)).reshape(b, s, -1)
        # CRNN: average each row of the feature map over its width. Adaptive pooling, not
        # mean(): its gradient is contiguous, which MONAI's GradCAM needs (it calls view()).
        fmap = self.encoder(x)
        return F.adaptive_avg_pool2d(fmap, (fmap.shape[2], 1)).squeeze(3).transpose(1, 2)

    def forward_features(self, x, **extra):
        out, _ = self.rnn(self.sequence(x))
        weights = torch.softmax(self.attn(out).squeeze(-1), dim=1)
        # Kept so a caller can show which slices / frames / views the decision rests on.
        self.last_attention = weights.detach()
        return self.dropout((weights.unsqueeze(-1) * out).sum(dim=1))

    def explanation_method(self, x: torch.Tensor) -> str:
        # Grad-CAM needs one feature map per image; a volume is encoded slice by
        # slice, so there the slice attention is the explanation.
        return "attention" if x.dim() == 5 else "gradcam"

    def attention_map(self, x: torch.Tensor) -> torch.Tensor:
        """The RNN's attention painted back onto the input, in [0, 1].

        3D input: one weight per slice, ``(B, S, H, W)``; 2D input: one weight
        per feature-map row, stretched over the image's rows, ``(B, H, W)``.
        """
        self.forward_features(x)
        a = self.last_attention
        a = a / a.amax(dim=1, keepdim=True).clamp(min=1e-12)
        if x.dim() == 5:
            return a[:, :, None, None].expand(-1, -1, x.shape[3], x.shape[4])
        rows = F.interpolate(a[:, None], size=x.shape[2], mode="nearest")[:, 0]
        return rows[:, :, None].expand(-1, -1, x.shape[3])


@register_model("cnn-gru", "rnn", input_kind="sequence",
                description="2D CNN per slice/frame/view + bidirectional GRU, attention pooling")
def cnn_gru(spatial_dims=2, in_channels=1, num_outputs=2, image_size=64, hidden: int = 128,
            dropout: float = 0.2) -> SequenceRNN:
    return SequenceRNN(in_channels, num_outputs, "gru", hidden, dropout)


@register_model("cnn-lstm", "rnn", input_kind="sequence",
                description="2D CNN per slice/frame/view + bidirectional LSTM, attention pooling")
def cnn_lstm(spatial_dims=2, in_channels=1, num_outputs=2, image_size=64, hidden: int = 128,
             dropout: float = 0.2) -> SequenceRNN:
    return SequenceRNN(in_channels, num_outputs, "lstm", hidden, dropout)
