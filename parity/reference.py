"""The tutorial's PyTorch modules (NCHW), verbatim in structure and attribute names.

A `state_dict` saved by the tutorial's own script loads into `CBAM_CNN` with `strict=True`.
Kept faithful on purpose, quirks included: below 16 channels `C // ratio` is 0, a zero-width MLP
whose gate is a constant 0.5 (`cbam_jax.ChannelAttention` floors the width at 1 instead), and
`CBAM_CNN` reuses `relu3` after `fc1`.
"""
import torch
import torch.nn as nn

# The tutorial's printed listing of CBAM_CNN's parameters, in order (docs/recipe.md).
TUTORIAL_COUNTS = {
    "conv1.weight": 864, "conv1.bias": 32, "bn1.weight": 32, "bn1.bias": 32,
    "cbam1.channel_attn.fc.0.weight": 64, "cbam1.channel_attn.fc.2.weight": 64,
    "cbam1.spatial_attn.conv.weight": 98,
    "conv2.weight": 18432, "conv2.bias": 64, "bn2.weight": 64, "bn2.bias": 64,
    "cbam2.channel_attn.fc.0.weight": 256, "cbam2.channel_attn.fc.2.weight": 256,
    "cbam2.spatial_attn.conv.weight": 98,
    "conv3.weight": 73728, "conv3.bias": 128, "bn3.weight": 128, "bn3.bias": 128,
    "cbam3.channel_attn.fc.0.weight": 1024, "cbam3.channel_attn.fc.2.weight": 1024,
    "cbam3.spatial_attn.conv.weight": 98,
    "fc1.weight": 1048576, "fc1.bias": 512, "fc2.weight": 5120, "fc2.bias": 10,
}


class ChannelAttention(nn.Module):
    """Shared bias-free MLP over global average and max pools, summed, then sigmoid."""

    def __init__(self, in_channels, ratio=16):
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.max_pool = nn.AdaptiveMaxPool2d(1)
        self.fc = nn.Sequential(
            nn.Linear(in_channels, in_channels // ratio, bias=False),
            nn.ReLU(),
            nn.Linear(in_channels // ratio, in_channels, bias=False),
        )
        self.sigmoid = nn.Sigmoid()

    def forward(self, x):  # x: [B, C, H, W]
        b, c, h, w = x.shape
        avg_out = self.fc(self.avg_pool(x).view(b, c))
        max_out = self.fc(self.max_pool(x).view(b, c))
        attention = self.sigmoid(avg_out + max_out).view(b, c, 1, 1)
        return x * attention


class SpatialAttention(nn.Module):
    """k x k conv over the channel-wise [mean, max] maps, then sigmoid."""

    def __init__(self, kernel_size=7):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x):  # x: [B, C, H, W]
        avg_out = torch.mean(x, dim=1, keepdim=True)
        max_out, _ = torch.max(x, dim=1, keepdim=True)
        pool_out = torch.cat([avg_out, max_out], dim=1)  # [B, 2, H, W]
        attention = self.conv(pool_out)
        return x * self.sigmoid(attention)


class CBAM(nn.Module):
    """Channel attention, then spatial attention."""

    def __init__(self, in_channels, ratio=16, kernel_size=7):
        super().__init__()
        self.channel_attn = ChannelAttention(in_channels, ratio)
        self.spatial_attn = SpatialAttention(kernel_size)

    def forward(self, x):
        x = self.channel_attn(x)
        x = self.spatial_attn(x)
        return x


class CBAM_CNN(nn.Module):  # noqa: N801 (the tutorial's name, kept for its checkpoints)
    """The tutorial's CIFAR-10 model: 3 conv-BN-ReLU-pool-CBAM blocks, then fc1-ReLU-dropout-fc2."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, kernel_size=3, padding=1)
        self.bn1 = nn.BatchNorm2d(32)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(kernel_size=2)
        self.cbam1 = CBAM(in_channels=32)

        self.conv2 = nn.Conv2d(32, 64, kernel_size=3, padding=1)
        self.bn2 = nn.BatchNorm2d(64)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(kernel_size=2)
        self.cbam2 = CBAM(in_channels=64)

        self.conv3 = nn.Conv2d(64, 128, kernel_size=3, padding=1)
        self.bn3 = nn.BatchNorm2d(128)
        self.relu3 = nn.ReLU()
        self.pool3 = nn.MaxPool2d(kernel_size=2)
        self.cbam3 = CBAM(in_channels=128)

        self.fc1 = nn.Linear(128 * 4 * 4, 512)
        self.dropout = nn.Dropout(p=0.5)
        self.fc2 = nn.Linear(512, 10)

    def forward(self, x):  # x: [B, 3, 32, 32]
        x = self.cbam1(self.pool1(self.relu1(self.bn1(self.conv1(x)))))
        x = self.cbam2(self.pool2(self.relu2(self.bn2(self.conv2(x)))))
        x = self.cbam3(self.pool3(self.relu3(self.bn3(self.conv3(x)))))
        x = x.view(-1, 128 * 4 * 4)  # flattened in (C, H, W) order
        x = self.fc1(x)
        x = self.relu3(x)  # the tutorial reuses relu3 here
        x = self.dropout(x)
        x = self.fc2(x)
        return x
