"""The tiny conv model of the PEFT goldens (arch "conv", not from transformers) and its inputs.

Stdlib-only at top level (torch is imported when the class is asked for), so that both the PEFT worker (inside a
venv) and tests/models.py (loaded by path) build the same module.
"""


def conv_model_class():
    """arch "conv", a tiny model that is not from transformers, for Conv LoRA (torch only, imported when called).

    conv1 (nn.Conv2d 3→8, 3×3, stride 2, padding 1) → conv2 (nn.Conv2d 8→8, 3×3, padding 1) → conv3d (nn.Conv3d
    8→8, kernel (1, 3, 3), padding (0, 1, 1), on the map with a depth of 1) → conv1d (nn.Conv1d 8→8, kernel 3,
    stride 2, padding 1, over the flattened 4×4 map) → mean → head (nn.Linear 8→num_labels), ReLU in between. All
    groups=1, dilation 1. ``forward(pixel_values)`` takes (N, in_channels, 8, 8) and returns an object with
    ``.logits``, as transformers models do. Rebuilt as ``cls(**config.json)``; tests/models.py imports it from
    here, so the tests and the goldens build the same module.
    """
    import types

    import torch
    from torch import nn

    class TinyConvNet(nn.Module):
        def __init__(self, in_channels: int = 3, channels: int = 8, num_labels: int = 5):
            super().__init__()
            self.kwargs = dict(in_channels=in_channels, channels=channels, num_labels=num_labels)
            self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=2, padding=1)
            self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
            self.conv3d = nn.Conv3d(channels, channels, (1, 3, 3), padding=(0, 1, 1))
            self.conv1d = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
            self.head = nn.Linear(channels, num_labels)

        def forward(self, pixel_values):
            h = torch.relu(self.conv1(pixel_values))
            h = torch.relu(self.conv2(h))
            h = torch.relu(self.conv3d(h.unsqueeze(2))).squeeze(2)
            h = torch.relu(self.conv1d(h.flatten(2)))
            return types.SimpleNamespace(logits=self.head(h.mean(-1)))

    return TinyConvNet


def conv_inputs() -> dict:
    """pixel_values (2, 3, 8, 8) for arch "conv": fixed values in [-1, 1], exact in JSON and in float32."""
    return {"pixel_values": [[[[((7 * n + 5 * c + 3 * i + j) % 17 - 8) / 8 for j in range(8)] for i in range(8)]
                              for c in range(3)] for n in range(2)]}
