"""The ADM networks: ``UNet`` (the diffusion model), ``SuperResUNet`` and ``EncoderUNet``.

Module names and order follow the released guided-diffusion checkpoints exactly (``time_embed``,
``label_emb``, ``input_blocks``, ``middle_block``, ``output_blocks``, ``out``), so their weights
load with ``load_state_dict(..., strict=True)`` and no key map.

Differences from the original, on purpose:

* ``use_checkpoint`` applies to attention blocks too, and only when set (the original always
  checkpoints attention, which breaks double backward).
* ``dtype`` is the dtype of the convolution trunk's weights, so a model built with
  ``use_fp16=True`` but never converted runs in float32 instead of failing on its first conv.
* Image sizes 8, 16 and 32 have default channel multipliers, and any size works with an explicit
  ``channel_mult``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from admkit.errors import UserError
from admkit.nn import (
    AttentionBlock,
    AttentionPool2d,
    Downsample,
    ResBlock,
    TimestepEmbedSequential,
    Upsample,
    heads_for,
    normalization,
    number_dropout_layers,
    timestep_embedding,
    zero_module,
)

# image size -> channel multipliers: the original's table (64..512) plus small sizes of our own
DEFAULT_CHANNEL_MULT = {
    512: (0.5, 1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
    32: (1, 2, 2, 2),
    16: (1, 2, 2),
    8: (1, 2),
}
POOLS = ("adaptive", "attention", "spatial", "spatial_v2")
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def default_channel_mult(image_size: int) -> tuple[float, ...]:
    """Channel multipliers per resolution level for ``image_size`` (512, 256, ..., 16, 8)."""
    if image_size not in DEFAULT_CHANNEL_MULT:
        sizes = ", ".join(str(s) for s in sorted(DEFAULT_CHANNEL_MULT))
        raise UserError(
            f"no default channel_mult for image size {image_size} (defaults exist for {sizes}); "
            "pass --channel_mult explicitly, e.g. 1,2,2,2"
        )
    return DEFAULT_CHANNEL_MULT[image_size]


def attention_ds_from_resolutions(image_size: int, resolutions: tuple[int, ...]) -> tuple[int, ...]:
    """Downsample rates image_size // r for feature-map resolutions r (guided-diffusion's rule)."""
    return tuple(image_size // int(r) for r in resolutions)


def _validate(config: UNetConfig | EncoderUNetConfig, num_heads_upsample: int | None) -> None:
    """Check a configuration, raising a one-line UserError for anything a user can fix."""
    mult = config.channel_mult
    if config.image_size <= 0 or config.model_channels <= 0 or config.num_res_blocks <= 0:
        raise UserError("image_size, num_channels and num_res_blocks must be positive")
    factor = 2 ** (len(mult) - 1)
    if config.image_size % factor:
        raise UserError(
            f"image size {config.image_size} is not divisible by {factor}, the total downsampling "
            f"of channel_mult {mult}; choose a size or a shorter channel_mult that fits"
        )
    widths = [int(m * config.model_channels) for m in mult]
    if any(w <= 0 or w % 32 for w in widths):
        raise UserError(
            f"num_channels {config.model_channels} x channel_mult {mult} gives widths {widths}; "
            "each must be a positive multiple of 32 (GroupNorm has 32 groups)"
        )
    attended = [w for level, w in enumerate(widths) if 2**level in config.attention_ds]
    checks = [(w, config.num_heads) for w in attended + widths[-1:]]
    checks += [(w, num_heads_upsample or config.num_heads) for w in attended]
    for width, heads in checks:
        try:
            heads_for(width, heads, config.num_head_channels)
        except ValueError as error:
            raise UserError(f"{error}; change num_heads or num_head_channels") from None


def _normalise(config) -> None:
    # Frozen dataclasses may still fix up their own fields in __post_init__; lists from JSON
    # become tuples, and an unset channel_mult takes the default for the image size.
    mult = config.channel_mult
    mult = default_channel_mult(config.image_size) if mult is None else tuple(mult)
    object.__setattr__(config, "channel_mult", mult)
    object.__setattr__(config, "attention_ds", tuple(int(d) for d in config.attention_ds))
    # guided-diffusion writes "not set" as -1; accept it as None
    for name in ("num_head_channels", "num_heads_upsample"):
        if getattr(config, name, None) == -1:
            object.__setattr__(config, name, None)


@dataclass(frozen=True)
class UNetConfig:
    """Hyper-parameters of ``UNet`` / ``SuperResUNet`` (the original's UNetModel arguments).

    ``attention_ds`` lists downsample rates (1 = full resolution, 2 = half, ...) whose blocks get
    attention; ``attention_ds_from_resolutions`` converts guided-diffusion's resolution flags.
    ``num_head_channels`` set means heads = channels // num_head_channels; otherwise
    ``num_heads`` heads (``num_heads_upsample`` in the decoder, default ``num_heads``). For a
    ``SuperResUNet``, ``in_channels`` counts the image channels only; the low-resolution copy is
    stacked on top internally.
    """

    image_size: int
    in_channels: int = 3
    model_channels: int = 128
    out_channels: int = 3
    num_res_blocks: int = 2
    attention_ds: tuple[int, ...] = (4, 8)
    dropout: float = 0.0
    channel_mult: tuple[float, ...] | None = None
    num_classes: int | None = None
    use_checkpoint: bool = False
    use_fp16: bool = False
    num_heads: int = 4
    num_head_channels: int | None = None
    num_heads_upsample: int | None = None
    use_scale_shift_norm: bool = True
    resblock_updown: bool = False
    use_new_attention_order: bool = False

    def __post_init__(self):
        _normalise(self)
        if self.num_classes is not None and self.num_classes <= 0:
            raise UserError(f"num_classes must be a positive integer, got {self.num_classes}")
        _validate(self, self.num_heads_upsample)


@dataclass(frozen=True)
class EncoderUNetConfig:
    """Hyper-parameters of ``EncoderUNet``, the noise-aware classifier (EncoderUNetModel).

    ``pool`` picks the head: "adaptive" (global average pool + 1×1 conv), "attention"
    (attention pooling; needs ``num_head_channels``), "spatial" or "spatial_v2" (an MLP over the
    spatial means of every block's output).
    """

    image_size: int
    in_channels: int = 3
    model_channels: int = 128
    out_channels: int = 1000
    num_res_blocks: int = 2
    attention_ds: tuple[int, ...] = (2, 4, 8)
    dropout: float = 0.0
    channel_mult: tuple[float, ...] | None = None
    use_checkpoint: bool = False
    use_fp16: bool = False
    num_heads: int = 1
    num_head_channels: int | None = 64
    use_scale_shift_norm: bool = True
    resblock_updown: bool = True
    use_new_attention_order: bool = False
    pool: str = "attention"

    def __post_init__(self):
        _normalise(self)
        if self.pool not in POOLS:
            raise UserError(f"unknown classifier pool {self.pool!r}; choose one of {POOLS}")
        if self.pool == "attention" and self.num_head_channels is None:
            raise UserError("the attention pool needs num_head_channels (e.g. 64)")
        _validate(self, None)


AnyConfig = UNetConfig | EncoderUNetConfig


def _attention(config: AnyConfig, channels: int, num_heads: int) -> AttentionBlock:
    return AttentionBlock(
        channels,
        num_heads=num_heads,
        num_head_channels=config.num_head_channels,
        new_order=config.use_new_attention_order,
        use_checkpoint=config.use_checkpoint,
    )


def _resblock(config: AnyConfig, channels: int, out_channels: int, **resample) -> ResBlock:
    return ResBlock(
        channels,
        4 * config.model_channels,
        config.dropout,
        out_channels=out_channels,
        use_scale_shift_norm=config.use_scale_shift_norm,
        use_checkpoint=config.use_checkpoint,
        **resample,
    )


def _time_embed(model_channels: int) -> nn.Sequential:
    width = 4 * model_channels
    return nn.Sequential(nn.Linear(model_channels, width), nn.SiLU(), nn.Linear(width, width))


def _build_encoder(config: AnyConfig, in_channels: int):
    """The down-sampling half and the middle block, shared by UNet and EncoderUNet.

    Returns (input_blocks, middle_block, channels of every input block's output, last width,
    final downsample rate).
    """
    mc = config.model_channels
    ch = int(config.channel_mult[0] * mc)
    blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(in_channels, ch, 3, padding=1))])
    skip_channels, ds = [ch], 1
    for level, mult in enumerate(config.channel_mult):
        for _ in range(config.num_res_blocks):
            layers = [_resblock(config, ch, int(mult * mc))]
            ch = int(mult * mc)
            if ds in config.attention_ds:
                layers.append(_attention(config, ch, config.num_heads))
            blocks.append(TimestepEmbedSequential(*layers))
            skip_channels.append(ch)
        if level != len(config.channel_mult) - 1:
            if config.resblock_updown:
                down = _resblock(config, ch, ch, down=True)
            else:
                down = Downsample(ch)
            blocks.append(TimestepEmbedSequential(down))
            skip_channels.append(ch)
            ds *= 2
    middle = TimestepEmbedSequential(
        _resblock(config, ch, ch),
        _attention(config, ch, config.num_heads),
        _resblock(config, ch, ch),
    )
    return blocks, middle, skip_channels, ch, ds


def _convert_convs(modules: list[nn.Module], dtype: torch.dtype) -> None:
    # Only convolutions change dtype; GroupNorm, Linear and the embeddings stay float32, as in
    # the original.
    for module in modules:
        for layer in module.modules():
            if isinstance(layer, _CONVS):
                layer.weight.data = layer.weight.data.to(dtype)
                if layer.bias is not None:
                    layer.bias.data = layer.bias.data.to(dtype)


def _timesteps(t: torch.Tensor | int | float, x: torch.Tensor) -> torch.Tensor:
    """t as a tensor [N] on x's device; a scalar is broadcast over the batch."""
    t = torch.as_tensor(t, device=x.device)
    if t.ndim == 0:
        t = t.expand(x.shape[0])
    if t.shape != (x.shape[0],):
        raise ValueError(f"timesteps must have shape [{x.shape[0]}], got {list(t.shape)}")
    return t


class _Trunk(nn.Module):
    """What UNet and EncoderUNet share: the timestep embedding, fp16 conversion, size checks."""

    input_blocks: nn.ModuleList
    middle_block: TimestepEmbedSequential

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the convolution trunk computes in (float16 after ``convert_to_fp16``)."""
        return self.input_blocks[0][0].weight.dtype

    def _trunk_modules(self) -> list[nn.Module]:
        return [self.input_blocks, self.middle_block]

    def convert_to_fp16(self, dtype: torch.dtype = torch.float16) -> None:
        """Cast the trunk's convolutions to ``dtype`` (float16 by default; bfloat16 works too)."""
        _convert_convs(self._trunk_modules(), dtype)

    def convert_to_fp32(self) -> None:
        """Undo ``convert_to_fp16``."""
        _convert_convs(self._trunk_modules(), torch.float32)

    def _embed(self, t: torch.Tensor | int | float, x: torch.Tensor) -> torch.Tensor:
        factor = 2 ** (len(self.config.channel_mult) - 1)
        if x.ndim != 4 or x.shape[-1] % factor or x.shape[-2] % factor:
            raise UserError(
                f"input of shape {list(x.shape)} does not fit the model: expected [N, C, H, W] "
                f"with H and W divisible by {factor}"
            )
        t_emb = timestep_embedding(_timesteps(t, x), self.config.model_channels)
        return self.time_embed(t_emb.to(self.time_embed[0].weight.dtype))


class UNet(_Trunk):
    """The ADM noise-prediction network ε_θ(x_t, t, y).

    Args:
        config: the hyper-parameters.

    Forward:
        x: noisy images [N, C_in, H, W].
        t: timesteps [N] (int or float), or a scalar for the whole batch.
        y: class labels [N] (int64), required iff ``config.num_classes`` is set.

    Returns:
        [N, C_out, H, W] in x's dtype (C_out = 6 with learned variances: ε then v).
    """

    # how many images are stacked along the channels at the input (2 for super-resolution)
    _stacked_inputs = 1

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        mc, emb_dim = config.model_channels, 4 * config.model_channels
        self.num_classes = config.num_classes
        self.time_embed = _time_embed(mc)
        if config.num_classes is not None:
            self.label_emb = nn.Embedding(config.num_classes, emb_dim)
        in_channels = config.in_channels * self._stacked_inputs
        self.input_blocks, self.middle_block, skips, ch, ds = _build_encoder(config, in_channels)

        heads_up = config.num_heads_upsample or config.num_heads
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(config.channel_mult))):
            for i in range(config.num_res_blocks + 1):
                layers = [_resblock(config, ch + skips.pop(), int(mc * mult))]
                ch = int(mc * mult)
                if ds in config.attention_ds:
                    layers.append(_attention(config, ch, heads_up))
                if level and i == config.num_res_blocks:
                    if config.resblock_updown:
                        layers.append(_resblock(config, ch, ch, up=True))
                    else:
                        layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            normalization(ch),
            nn.SiLU(),
            zero_module(nn.Conv2d(ch, config.out_channels, 3, padding=1)),
        )
        number_dropout_layers(self)

    def _trunk_modules(self) -> list[nn.Module]:
        return [self.input_blocks, self.middle_block, self.output_blocks]

    def forward(
        self, x: torch.Tensor, t: torch.Tensor | int | float, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        emb = self._embed(t, x)
        if self.num_classes is None:
            if y is not None:
                raise UserError(
                    "class labels were given to an unconditional model; drop them, or use a "
                    "class-conditional model (class_cond True)"
                )
        else:
            if y is None:
                raise UserError(
                    f"this model is class-conditional ({self.num_classes} classes) and needs "
                    "class labels y"
                )
            if y.shape != (x.shape[0],):
                raise ValueError(f"labels y must have shape [{x.shape[0]}], got {list(y.shape)}")
            emb = emb + self.label_emb(y.to(emb.device)).to(emb.dtype)

        h = x.to(self.dtype)
        skips = []
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h.to(x.dtype))


class SuperResUNet(UNet):
    """A UNet conditioned on a low-resolution image, stacked after the noisy input.

    Forward:
        x: noisy high-resolution images [N, C, H, W].
        t: timesteps [N].
        low_res: the low-resolution images [N, C, h, w] in [-1, 1]; bilinearly upsampled to
            (H, W) and concatenated after x along the channels.
        y: class labels [N], iff the model is class-conditional.

    Returns:
        [N, C_out, H, W].
    """

    _stacked_inputs = 2

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor | int | float,
        low_res: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if low_res is None:
            raise UserError("a super-resolution model needs the low-resolution images (low_res)")
        upsampled = F.interpolate(low_res.to(x.dtype), size=x.shape[-2:], mode="bilinear")
        return super().forward(torch.cat([x, upsampled], dim=1), t, y=y)


class EncoderUNet(_Trunk):
    """The noise-aware classifier p_φ(y | x_t, t): the UNet's encoder and middle plus a head.

    Forward:
        x: noisy images [N, C_in, H, W].
        t: timesteps [N] (of the original, unrespaced process).

    Returns:
        logits [N, out_channels] in x's dtype.
    """

    def __init__(self, config: EncoderUNetConfig):
        super().__init__()
        self.config = config
        self.time_embed = _time_embed(config.model_channels)
        self.input_blocks, self.middle_block, skips, ch, ds = _build_encoder(
            config, config.in_channels
        )
        self.pool = config.pool
        out = config.out_channels
        if config.pool == "adaptive":
            self.out = nn.Sequential(
                normalization(ch),
                nn.SiLU(),
                nn.AdaptiveAvgPool2d((1, 1)),
                zero_module(nn.Conv2d(ch, out, 1)),
                nn.Flatten(),
            )
        elif config.pool == "attention":
            pool = AttentionPool2d(config.image_size // ds, ch, config.num_head_channels, out)
            self.out = nn.Sequential(normalization(ch), nn.SiLU(), pool)
        else:
            # the spatial heads read the mean of every input block's output and of the middle's
            feature_size = sum(skips) + ch
            if config.pool == "spatial":
                self.out = nn.Sequential(
                    nn.Linear(feature_size, 2048), nn.ReLU(), nn.Linear(2048, out)
                )
            else:
                self.out = nn.Sequential(
                    nn.Linear(feature_size, 2048),
                    normalization(2048),
                    nn.SiLU(),
                    nn.Linear(2048, out),
                )
        number_dropout_layers(self)

    def forward(self, x: torch.Tensor, t: torch.Tensor | int | float) -> torch.Tensor:
        emb = self._embed(t, x)
        spatial = self.pool.startswith("spatial")
        means = []
        h = x.to(self.dtype)
        for block in self.input_blocks:
            h = block(h, emb)
            if spatial:
                means.append(h.to(x.dtype).mean(dim=(2, 3)))
        h = self.middle_block(h, emb)
        if spatial:
            means.append(h.to(x.dtype).mean(dim=(2, 3)))
            return self.out(torch.cat(means, dim=-1))
        return self.out(h.to(x.dtype))
