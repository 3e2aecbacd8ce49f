"""The res25 first-pass-effect network (Zhang et al., AJNR 2024) in plain torch.

The network reads a stack of ``n_slices`` axial slices (default 25) with one channel per
modality (CT: NCCT, CTA, third channel; MR: ADC, DWI, FLAIR) and works in three stages:

1. **Trunk** -- a ResNet-34 (BasicBlocks ``3-4-6-3``). In the ``nonlocal`` variant an
   embedded-Gaussian non-local block (Wang et al., CVPR 2018) sits before the last BasicBlock
   of ``layer3``; the ``plain`` variant has none (the code path the public ``res2dot5()`` takes).
   Every slice of every case goes through the shared trunk in ONE call (``batch * n_slices``
   images), then global average pooling gives one 512-vector per slice.
2. **Groups** -- the slices form ``n_slices / group_size`` groups of neighbouring slices (5 x 5).
   One multi-head self-attention module (4 heads, shared by all groups, as in the original where
   ``attn_1`` serves every group) mixes the slices of a group, with a residual connection. Each
   group has its own auxiliary head (``group_heads[g]``: linear on the flattened group), used
   for deep supervision in training.
3. **Slice classifier** -- one linear score per slice, a softmax over the slices (the *slice
   weights*, which the attention map uses) and a linear layer from the weights to the logit.

Differences from the original code, on purpose:

* Dropout is functional with ``training=self.training``: it is never active in ``eval()``
  (the original calls ``F.dropout(p=0.2)`` without ``training=``, so it drops at inference).
* The original's unused parameters (``attn_2..attn_5``, ``fc``) and its alias modules
  (``shared_features``, ``ind_features``) do not exist here; ``inference.model.checkpoint``
  maps the original's keys onto this module.
* The original runs the trunk once per slice in a copy-pasted loop per group; here the slices
  are batched and the groups are a loop over a ``ModuleList``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Variant = Literal["nonlocal", "plain"]
VARIANTS: tuple[str, ...] = ("nonlocal", "plain")


@dataclass(frozen=True)
class Res25Config:
    """Architecture of one res25 network: enough to rebuild it from a checkpoint card.

    Parameters
    ----------
    variant
        ``"nonlocal"`` (non-local block before the last block of ``layer3``, as the paper
        describes) or ``"plain"``.
    in_channels
        Image channels (modalities) per slice.
    n_slices, group_size
        Slices per case and slices per attention group; ``n_slices`` must be a multiple of
        ``group_size``.
    widths, blocks
        Channels and BasicBlocks of ``layer1..layer4`` (ResNet-34: 64-128-256-512, 3-4-6-3).
        Reduced values give a small model for tests and training on CPU.
    num_heads
        Heads of the slice-group self-attention; must divide ``widths[3]``.
    dropout
        Probability of the two functional dropouts (active in ``train()`` only).
    """

    variant: Variant = "nonlocal"
    in_channels: int = 3
    n_slices: int = 25
    group_size: int = 5
    widths: tuple[int, int, int, int] = (64, 128, 256, 512)
    blocks: tuple[int, int, int, int] = (3, 4, 6, 3)
    num_heads: int = 4
    dropout: float = 0.2

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        for name in ("in_channels", "n_slices", "group_size", "num_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.n_slices % self.group_size:
            raise ValueError(f"n_slices ({self.n_slices}) must be a multiple of group_size ({self.group_size})")
        if len(self.widths) != 4 or any(int(w) < 1 for w in self.widths):
            raise ValueError(f"widths must be 4 positive integers, got {self.widths!r}")
        if len(self.blocks) != 4 or any(int(b) < 1 for b in self.blocks):
            raise ValueError(f"blocks must be 4 positive integers, got {self.blocks!r}")
        if self.variant == "nonlocal" and self.blocks[2] < 2:
            raise ValueError("the nonlocal variant needs at least 2 blocks in layer3 (blocks[2] >= 2)")
        if self.widths[3] % self.num_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must divide widths[3] ({self.widths[3]})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        # Normalise lists (from JSON) to tuples so equal configs compare equal.
        object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))
        object.__setattr__(self, "blocks", tuple(int(b) for b in self.blocks))

    @property
    def n_groups(self) -> int:
        """Number of slice groups."""
        return self.n_slices // self.group_size

    @property
    def feature_dim(self) -> int:
        """Length of the per-slice feature vector (channels of ``layer4``)."""
        return self.widths[3]

    @classmethod
    def reduced(cls, variant: Variant = "nonlocal", **overrides: Any) -> "Res25Config":
        """A small configuration (widths 8-16-32-64, blocks 1-1-2-1) for tests and CPU training."""
        values: dict[str, Any] = {"variant": variant, "widths": (8, 16, 32, 64), "blocks": (1, 1, 2, 1)}
        values.update(overrides)
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-compatible form (stored in checkpoint cards)."""
        values = asdict(self)
        values["widths"] = list(self.widths)
        values["blocks"] = list(self.blocks)
        return values

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "Res25Config":
        """Inverse of :meth:`to_dict`; unknown fields raise ``ValueError`` naming them."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown Res25Config fields: {', '.join(unknown)}")
        kwargs = dict(values)
        for key in ("widths", "blocks"):
            if key in kwargs:
                kwargs[key] = tuple(kwargs[key])
        return cls(**kwargs)


@dataclass(frozen=True)
class Res25Output:
    """What one forward pass returns (batch size ``B``).

    Attributes
    ----------
    logits
        ``(B, 1)`` first-pass-effect logit (before calibration).
    aux_logits
        ``(B, n_groups)`` logits of the per-group auxiliary heads (original ``fc_<g>_1``).
    slice_scores
        ``(B, n_slices)`` per-slice scores before the softmax.
    slice_weights
        ``(B, n_slices)`` softmax of ``slice_scores``: how much each slice drives the logit.
    features
        ``(B, n_slices, C, h, w)`` feature maps of the last convolutional stage (``layer4``)
        when asked for (Grad-CAM), else ``None``.
    """

    logits: Tensor
    aux_logits: Tensor
    slice_scores: Tensor
    slice_weights: Tensor
    features: Tensor | None = None


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convolutions with batch norm and an identity shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: Tensor) -> Tensor:
        """Residual block output, same layout as ``x``."""
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        return F.relu(out + identity, inplace=True)


class NonLocalBlock2d(nn.Module):
    """Embedded-Gaussian non-local block (Wang et al., CVPR 2018) with a batch-normed output.

    ``z = W_z(softmax(theta(x)^T phi(x)) g(x)) + x`` over all spatial positions; the inner
    width is half the input channels. Parameter names follow the original (``g``, ``theta``,
    ``phi``, ``W_z``) so its checkpoints load unchanged.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        inner = max(channels // 2, 1)
        self.inner = inner
        self.g = nn.Conv2d(channels, inner, kernel_size=1)
        self.W_z = nn.Sequential(nn.Conv2d(inner, channels, kernel_size=1), nn.BatchNorm2d(channels))
        self.theta = nn.Conv2d(channels, inner, kernel_size=1)
        self.phi = nn.Conv2d(channels, inner, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        """Non-local response added to ``x``."""
        n, _, h, w = x.shape
        query = self.theta(x).flatten(2).transpose(1, 2)  # (N, HW, inner)
        key = self.phi(x).flatten(2).transpose(1, 2)
        value = self.g(x).flatten(2).transpose(1, 2)
        # Embedded Gaussian = softmax of raw dot products: attention with scale 1.
        y = F.scaled_dot_product_attention(query, key, value, scale=1.0)
        y = y.transpose(1, 2).reshape(n, self.inner, h, w)
        return self.W_z(y) + x


class SliceAttention(nn.Module):
    """Multi-head self-attention over the slices of a group (timm ``Attention`` equivalent).

    ``qkv`` and ``proj`` are linear layers with bias; scaled dot-product attention per head.
    """

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, tokens: Tensor) -> Tensor:
        """Attention output for ``tokens`` of shape ``(N, length, dim)``."""
        n, length, dim = tokens.shape
        head_dim = dim // self.num_heads
        qkv = self.qkv(tokens).reshape(n, length, 3, self.num_heads, head_dim).permute(2, 0, 3, 1, 4)
        query, key, value = qkv.unbind(0)
        mixed = F.scaled_dot_product_attention(query, key, value)
        return self.proj(mixed.transpose(1, 2).reshape(n, length, dim))


def _make_layer(in_planes: int, planes: int, blocks: int, stride: int, non_local: bool) -> nn.Sequential:
    """``blocks`` BasicBlocks; with ``non_local`` the non-local block goes before the last one."""
    layers: list[nn.Module] = [BasicBlock(in_planes, planes, stride)]
    layers.extend(BasicBlock(planes, planes) for _ in range(1, blocks - 1))
    if non_local:
        layers.append(NonLocalBlock2d(planes))
    if blocks > 1:
        layers.append(BasicBlock(planes, planes))
    return nn.Sequential(*layers)


class Res25(nn.Module):
    """The res25 network; see the module docstring.

    Parameters
    ----------
    variant
        ``"nonlocal"`` or ``"plain"`` (ignored when ``config`` is given).
    config
        Full architecture; ``Res25Config(variant=variant, **options)`` when omitted.
    **options
        Any other :class:`Res25Config` field (``in_channels``, ``n_slices``, ``group_size``,
        ``widths``, ``blocks``, ``num_heads``, ``dropout``).
    """

    def __init__(self, variant: Variant = "nonlocal", config: Res25Config | None = None, **options: Any) -> None:
        super().__init__()
        if config is None:
            config = Res25Config(variant=variant, **options)
        elif options:
            raise ValueError("give either config or options, not both")
        self.config = config
        widths, blocks = config.widths, config.blocks
        self.conv1 = nn.Conv2d(config.in_channels, widths[0], kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.layer1 = _make_layer(widths[0], widths[0], blocks[0], 1, False)
        self.layer2 = _make_layer(widths[0], widths[1], blocks[1], 2, False)
        self.layer3 = _make_layer(widths[1], widths[2], blocks[2], 2, config.variant == "nonlocal")
        self.layer4 = _make_layer(widths[2], widths[3], blocks[3], 2, False)
        dim = config.feature_dim
        self.attention = SliceAttention(dim, config.num_heads)
        self.group_heads = nn.ModuleList(nn.Linear(dim * config.group_size, 1) for _ in range(config.n_groups))
        self.slice_head = nn.Linear(dim, 1)
        self.slice_mix = nn.Linear(config.n_slices, 1)

    @property
    def variant(self) -> str:
        """``"nonlocal"`` or ``"plain"``."""
        return self.config.variant

    def trunk(self, images: Tensor) -> Tensor:
        """``layer4`` feature maps ``(N, C, h, w)`` for a batch of 2-D images ``(N, in_channels, H, W)``."""
        x = F.relu(self.bn1(self.conv1(images)), inplace=True)
        x = F.max_pool2d(x, kernel_size=3, stride=2, padding=1)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        return self.layer4(x)

    def slice_images(self, volumes: Tensor) -> Tensor:
        """``(B, C, S, H, W)`` case volumes as ``(B * S, C, H, W)`` slice images (slice-major per case)."""
        if volumes.dim() != 5:
            raise ValueError(f"expected (batch, channels, slices, H, W), got shape {tuple(volumes.shape)}")
        b, c, s, h, w = volumes.shape
        if c != self.config.in_channels or s != self.config.n_slices:
            raise ValueError(
                f"expected {self.config.in_channels} channels x {self.config.n_slices} slices, "
                f"got {c} x {s} (shape {tuple(volumes.shape)})"
            )
        images = volumes.transpose(1, 2).reshape(b * s, c, h, w)
        if self.conv1.weight.is_contiguous(memory_format=torch.channels_last):
            images = images.contiguous(memory_format=torch.channels_last)
        return images

    def head(self, feature_maps: Tensor, batch_size: int, return_features: bool = False) -> Res25Output:
        """From ``layer4`` maps ``(B * S, C, h, w)`` to the outputs (groups, attention, classifier)."""
        cfg = self.config
        pooled = F.adaptive_avg_pool2d(feature_maps, 1).flatten(1)
        pooled = F.dropout(pooled, cfg.dropout, training=self.training)
        dim = pooled.shape[1]
        groups = pooled.reshape(batch_size * cfg.n_groups, cfg.group_size, dim)
        groups = groups + self.attention(groups)  # one shared module serves every group
        groups = groups.reshape(batch_size, cfg.n_groups, cfg.group_size * dim)
        aux = torch.cat([group_head(groups[:, g]) for g, group_head in enumerate(self.group_heads)], dim=1)
        slices = F.dropout(groups.reshape(batch_size, cfg.n_slices, dim), cfg.dropout, training=self.training)
        slice_scores = self.slice_head(slices).squeeze(-1)
        slice_weights = torch.softmax(slice_scores, dim=1)
        logits = self.slice_mix(slice_weights)
        features = None
        if return_features:
            features = feature_maps.reshape(batch_size, cfg.n_slices, *feature_maps.shape[1:])
        return Res25Output(logits, aux, slice_scores, slice_weights, features)

    def forward(self, volumes: Tensor, return_features: bool = False) -> Res25Output:
        """Outputs for ``volumes`` of shape ``(B, in_channels, n_slices, H, W)``."""
        feature_maps = self.trunk(self.slice_images(volumes))
        return self.head(feature_maps, volumes.shape[0], return_features)


def seeded_init_(model: Res25, seed: int = 0) -> Res25:
    """Deterministic initialisation that depends only on ``seed`` and parameter names.

    Each tensor draws from its own generator seeded with ``crc32("<seed>:<name>")``, so the
    result does not depend on the global RNG, module construction order or platform. Convolutions
    and linear layers: He-normal on the fan-in (linear: ``1/sqrt(fan_in)``); batch-norm weights
    ``1 + 0.1 N(0,1)``, biases ``0.1 N(0,1)``, running mean 0 and variance 1; the last batch norm
    of each residual branch (``bn2``, the non-local ``W_z``) starts at a tenth of that, so that
    activations stay bounded through the 16 residual blocks (the idea of ``zero_init_residual``)
    and the slice weights do not collapse onto one slice. Used for the untrained demonstration
    weights.
    """
    import zlib

    with torch.no_grad():
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            gen = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{name}".encode()))
            if name.endswith("num_batches_tracked"):
                tensor.zero_()
            elif name.endswith("running_mean"):
                tensor.zero_()
            elif name.endswith("running_var"):
                tensor.fill_(1.0)
            elif tensor.dim() == 1 and name.endswith(("bn2.weight", "W_z.1.weight")):
                tensor.copy_(0.1 * (1.0 + 0.1 * torch.randn(tensor.shape, generator=gen)))
            elif tensor.dim() == 1 and name.endswith("weight"):
                tensor.copy_(1.0 + 0.1 * torch.randn(tensor.shape, generator=gen))
            elif tensor.dim() == 1:
                tensor.copy_(0.1 * torch.randn(tensor.shape, generator=gen))
            else:
                fan_in = tensor[0].numel()
                gain = math.sqrt(2.0) if tensor.dim() == 4 else 1.0
                tensor.copy_(torch.randn(tensor.shape, generator=gen) * gain / math.sqrt(fan_in))
    return model


def slice_by_slice_forward(model: Res25, volumes: Tensor) -> Res25Output:
    """The same network computed in the original code's order, for equivalence checks and benchmarks.

    One trunk call per single slice, a group at a time, the shared attention applied per group:
    what the published ``_forward_impl`` does (without its inference-time dropout). Use
    ``Res25.forward`` for real work: it is the same function, batched.
    """
    cfg = model.config
    group_tokens: list[Tensor] = []
    for g in range(cfg.n_groups):
        pooled = []
        for s in range(g * cfg.group_size, (g + 1) * cfg.group_size):
            image = volumes[:, :, s]
            if model.conv1.weight.is_contiguous(memory_format=torch.channels_last):
                image = image.contiguous(memory_format=torch.channels_last)
            pooled.append(F.adaptive_avg_pool2d(model.trunk(image), 1).flatten(1))
        tokens = torch.stack(pooled, dim=1)  # (B, group_size, dim)
        group_tokens.append(tokens + model.attention(tokens))
    aux = torch.cat([head(tokens.flatten(1)) for head, tokens in zip(model.group_heads, group_tokens)], dim=1)
    slices = torch.cat(group_tokens, dim=1)
    slice_scores = model.slice_head(slices).squeeze(-1)
    slice_weights = torch.softmax(slice_scores, dim=1)
    return Res25Output(model.slice_mix(slice_weights), aux, slice_scores, slice_weights)
