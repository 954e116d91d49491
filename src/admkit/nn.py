"""Small layers of the ADM network: normalisation, timestep embedding, attention, the blocks.

The blocks keep the sub-module names and order of the released guided-diffusion checkpoints
(``in_layers``, ``emb_layers``, ``out_layers``, ``skip_connection``, ``norm``, ``qkv``,
``proj_out``, ``op``, ``conv``, ``positional_embedding``, ``qkv_proj``, ``c_proj``), so their
state-dict keys are the released ones.

Notation:

| symbol | meaning |
| --- | --- |
| N | batch size |
| C | channels of a feature map |
| H, W | height and width of a feature map; L = H·W tokens for attention |
| n_h | number of attention heads; c = C / n_h channels per head |
| t | diffusion timestep, integer or fractional, shape [N] |
| e | embedding of t (plus the class embedding), shape [N, E] |
| q, k, v | queries, keys, values of one head, each [L, c] |
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from admkit.noise import current_example_seeds, derived_seed, seeded_generators

NUM_GROUPS = 32  # every GroupNorm of the network has 32 groups


class GroupNorm32(nn.GroupNorm):
    """GroupNorm that always computes in float32 and returns the input's dtype.

    Half-precision statistics over large feature maps lose too many digits; the original computes
    in float32 for that reason, and so does every fp16 path here. The CPU kernel takes bf16/fp16
    inputs with float32 affine parameters and accumulates in float32 itself, which gives the
    same result without the two copies, so on a CPU the input goes in as it is.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._group_norm(x, self.num_groups, self.weight, self.bias)

    def modulated(self, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        """Adaptive group norm GN(x)·(1 + scale) + shift, with per-example ``scale`` and ``shift``
        of shape [N, C], as one GroupNorm: the batch folded into the channels ([1, N·C, H, W],
        N·32 groups, the same statistics), with the per-example affine
        γ(1 + scale), β(1 + scale) + shift, so no separate product and sum pass over x."""
        batch, channels = x.shape[:2]
        dtype = torch.promote_types(self.weight.dtype, torch.float32)  # float32 at least
        gain = 1 + scale.to(dtype)
        weight = (self.weight * gain).reshape(-1)
        bias = (self.bias * gain + shift.to(dtype)).reshape(-1)
        folded = x.reshape(1, batch * channels, *x.shape[2:])
        return self._group_norm(folded, batch * self.num_groups, weight, bias).reshape(x.shape)

    def _group_norm(
        self,
        x: torch.Tensor,
        num_groups: int,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
    ) -> torch.Tensor:
        if x.device.type == "cpu":
            return F.group_norm(x, num_groups, weight, bias, self.eps)
        weight = None if weight is None else weight.float()
        bias = None if bias is None else bias.float()
        return F.group_norm(x.float(), num_groups, weight, bias, self.eps).to(x.dtype)


def normalization(channels: int) -> GroupNorm32:
    """The network's only normalisation: GroupNorm32 with 32 groups over ``channels``."""
    return GroupNorm32(NUM_GROUPS, channels)


def zero_module(module: nn.Module) -> nn.Module:
    """Set every parameter of ``module`` to zero and return it.

    Used on the last layer of each residual branch and on the output head, so that a fresh
    network starts as the identity on its residual path and outputs exactly zero.
    """
    for parameter in module.parameters():
        nn.init.zeros_(parameter)
    return module


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of timesteps: ``[cos(t·f_0..f_{d/2-1}) | sin(t·f_0..f_{d/2-1})]``.

    f_i = max_period^(-i / (dim // 2)); cosines come first, as in the released checkpoints. An odd
    ``dim`` gets a trailing zero column. ``t`` may be fractional (rescaled timesteps).

    Args:
        t: timesteps, shape [N], any numeric dtype.
        dim: embedding width.
        max_period: the longest period of the sinusoids.

    Returns:
        float32 tensor [N, dim].
    """
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )
    args = t.float()[:, None] * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


class _HalfAttention(torch.autograd.Function):
    """softmax(q kᵀ / √c) v per head in half precision on a CPU, from channels-first heads
    [B, 3, c, L] (q, k, v each [c, L], B = N·n_h) to channels-first outputs [B, c, L]: the
    same products as the textbook form (q·c^-1/2 rounded to half, half matrix products, the
    half softmax kernel, which accumulates in float32), read straight from the fused qkv layout,
    written straight into the [N, C, L] output, the gradient assembled in the qkv layout: no
    layout copies. The same bits forward and backward as the textbook form in bf16 (both qkv
    orders) and float16 (legacy order; in the new order 0.03 % of float16 outputs differ by one
    rounding). Forward and backward on this project's 2-core CPU (bf16, batch 16, 4 heads of
    32): 5.35 against 5.79 ms for the textbook form at 16² tokens, 0.55 against 0.74 at 8²
    (compiled: 5.10 against 5.59, 0.58 against 0.68)."""

    @staticmethod
    def forward(ctx, heads: torch.Tensor) -> torch.Tensor:
        q_t, k_t, v_t = heads.unbind(1)
        scale = heads.shape[2] ** -0.5
        q_t = q_t * scale
        probs = torch.softmax(torch.bmm(q_t.transpose(1, 2), k_t), dim=-1)
        ctx.save_for_backward(q_t, k_t, v_t, probs)
        return torch.bmm(v_t, probs.transpose(1, 2))

    @staticmethod
    def backward(ctx, grad_t: torch.Tensor) -> torch.Tensor:
        q_t, k_t, v_t, probs = ctx.saved_tensors
        grad_v = torch.bmm(grad_t, probs)
        grad_scores = torch.ops.aten._softmax_backward_data(
            torch.bmm(grad_t.transpose(1, 2), v_t), probs, -1, probs.dtype
        )
        grad_k = torch.bmm(q_t, grad_scores)
        grad_q = torch.bmm(k_t, grad_scores.transpose(1, 2)).mul_(k_t.shape[1] ** -0.5)
        return torch.stack([grad_q, grad_k, grad_v], 1)


def qkv_attention(qkv: torch.Tensor, num_heads: int, new_order: bool) -> torch.Tensor:
    """Multi-head self-attention over a fused qkv tensor: softmax(q kᵀ / √c) v for each head.

    Two channel layouts of the fused tensor exist in the released checkpoints:

    * legacy (``new_order=False``, every released model but the 64×64 one): head-major; head h
      owns channels [3c·h, 3c·(h+1)), split into its q, k, v of c channels each;
    * new (``new_order=True``, the 64×64 model and every attention pool): q/k/v-major; q, k, v
      are the three thirds of the channels, and head h uses channels [c·h, c·(h+1)) of each.

    Computed with ``scaled_dot_product_attention``, whose fused kernels accumulate the softmax
    in float32 for half inputs, as the original does explicitly; with float32 inputs the result
    equals the original's einsum formulation to rounding. Half inputs on a CPU take the
    original's own half-precision arithmetic instead (:class:`_HalfAttention`): scores and
    values through half matrix products, the softmax in float32 rounded back to half (the CPU's
    half softmax kernel does exactly that): in a bf16 training step of the benchmarks' small
    model, attention took half the time of the fused kernel run in float32 (profiled; the CPU's
    bf16 fused kernel is slower still). The fused kernels have no second derivative: for double
    backward (a gradient penalty), run the forward pass inside
    ``torch.nn.attention.sdpa_kernel(SDPBackend.MATH)``, in float32.

    Args:
        qkv: [N, 3C, L].
        num_heads: n_h, which must divide C.
        new_order: layout of the fused channels (see above).

    Returns:
        [N, C, L], heads concatenated head-major along the channels.
    """
    batch, width, length = qkv.shape
    if width % (3 * num_heads):
        raise ValueError(f"qkv width {width} is not divisible by 3 x {num_heads} heads")
    head_channels = width // (3 * num_heads)
    if qkv.device.type == "cpu" and qkv.dtype in (torch.bfloat16, torch.float16):
        if new_order:
            heads = qkv.reshape(batch, 3, num_heads, head_channels, length).transpose(1, 2)
        else:
            heads = qkv.reshape(batch, num_heads, 3, head_channels, length)
        out = _HalfAttention.apply(heads.reshape(batch * num_heads, 3, head_channels, length))
        return out.view(batch, num_heads * head_channels, length)
    if new_order:
        qkv = qkv.reshape(batch, 3, num_heads, head_channels, length).permute(1, 0, 2, 4, 3)
    else:
        qkv = qkv.reshape(batch, num_heads, 3, head_channels, length).permute(2, 0, 1, 4, 3)
    # One copy into [3, N, n_h, L, c] with c contiguous: the fused (flash) kernels need a unit
    # stride on the last dimension and otherwise fall back to the unfused math path.
    q, k, v = qkv.contiguous().unbind(0)
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(-1, -2).reshape(batch, num_heads * head_channels, length)


def _maybe_checkpoint(function, enabled: bool, *args: torch.Tensor) -> torch.Tensor:
    # Non-reentrant checkpointing supports double backward and keyword-free recomputation.
    if enabled and torch.is_grad_enabled():
        return checkpoint(function, *args, use_reentrant=False)
    return function(*args)


class TimestepBlock(nn.Module):
    """A block whose forward takes the embedding ``e`` as a second argument."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class TimestepEmbedSequential(nn.Sequential):
    """A sequence of blocks; the ones that are TimestepBlocks also receive ``e``."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = layer(x, emb) if isinstance(layer, TimestepBlock) else layer(x)
        return x


def _transposed_upsample_kernel(weight: torch.Tensor) -> torch.Tensor:
    """The 4×4 kernel of a stride-2 transposed convolution equal to a 3×3 convolution (padding 1)
    of the ×2 nearest-upsampled input.

    Along one axis, output row 2i + a of conv(up(x)) sees upsampled rows 2i + a - 1, 2i + a,
    2i + a + 1, which are input rows (i - 1, i, i) for a = 0 and (i, i, i + 1) for a = 1, so its
    taps (w_0, w_1, w_2) fold to w_0 on row i - 1 and w_1 + w_2 on row i, or to w_0 + w_1 on row
    i and w_2 on row i + 1. A transposed convolution of stride 2 and padding 1 sends input row r
    to output row 2r - 1 + k through tap k, so these four sums are its taps
    k = 3, 1, 2, 0: the axis kernel (w_2, w_1 + w_2, w_0 + w_1, w_0). Folding both axes gives
    the 2-D kernel.

    Args:
        weight: [O, I, 3, 3].

    Returns:
        [I, O, 4, 4], the layout ``conv_transpose2d`` takes.
    """

    def fold(w: torch.Tensor, dim: int) -> torch.Tensor:
        w_0, w_1, w_2 = w.unbind(dim)
        return torch.stack([w_2, w_1 + w_2, w_0 + w_1, w_0], dim)

    return fold(fold(weight, -2), -1).transpose(0, 1)


def upsample_conv(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """``conv(nearest ×2 upsampling of x)`` for a 3×3 convolution of stride 1 and padding 1,
    without building the upsampled map: one transposed convolution of stride 2 with the folded
    4×4 kernel of :func:`_transposed_upsample_kernel` (each output pixel sums 4 taps of x
    instead of 9 of the upsampled map: 16 multiply-adds per input pixel and channel pair instead
    of 36). The same sums in another order: float32 results agree to rounding. On this project's
    2-core CPU, forward and backward of the benchmark model's 16 → 32 pixel block (128 channels,
    batch 16) took 18.4 ms against 39.1 for the textbook form in float32, 11.9 against 20.0 in
    bf16.

    Shapes: [N, I, H, W] -> [N, O, 2H, 2W].
    """
    weight = conv.weight
    # Folded in at least float32 (a half-precision model's weights round once, after the sums).
    kernel = _transposed_upsample_kernel(
        weight.to(torch.promote_types(weight.dtype, torch.float32))
    )
    return F.conv_transpose2d(x, kernel.to(weight.dtype), conv.bias, stride=2, padding=1)


class Upsample(nn.Module):
    """Nearest-neighbour ×2 upsampling followed by a 3×3 convolution (key ``conv``).

    Args: channels C (input and output).
    Shapes: [N, C, H, W] -> [N, C, 2H, 2W].
    """

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return upsample_conv(x, self.conv)


class Downsample(nn.Module):
    """A 3×3 convolution of stride 2 (key ``op``).

    Shapes: [N, C, H, W] -> [N, C, ceil(H/2), ceil(W/2)].
    """

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class ExampleDropout(nn.Module):
    """Dropout whose mask for each example comes from that example's own seed.

    While :func:`admkit.noise.example_seeds` holds one seed per example of the batch (the
    training loop sets them), example n's mask in this layer is drawn from a generator seeded by
    (seed_n, ``stream``): the same in any batch, micro-batch or process, and the same again when
    a checkpointed block is recomputed in the backward pass. ``stream`` tells the layers of a
    network apart (see :func:`number_dropout_layers`). Without seeds, and inside
    ``torch.compile``, it is torch's dropout, drawn from the global generator.
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability {p} must lie in [0, 1)")
        self.p = p
        self.stream = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        seeds = current_example_seeds()
        if seeds is None or len(seeds) != x.shape[0] or torch.compiler.is_compiling():
            return F.dropout(x, self.p, training=True)
        generators = seeded_generators(
            (derived_seed(seed, self.stream) for seed in seeds), x.device
        )
        uniform = torch.stack(
            [torch.rand(x.shape[1:], generator=g, device=x.device) for g in generators]
        )
        return x * (uniform >= self.p).to(x.dtype) / (1.0 - self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}, stream={self.stream}"


def number_dropout_layers(network: nn.Module) -> None:
    """Give each :class:`ExampleDropout` of ``network`` its own stream, in module order."""
    layers = [m for m in network.modules() if isinstance(m, ExampleDropout)]
    for stream, layer in enumerate(layers):
        layer.stream = stream


class ResBlock(TimestepBlock):
    """Residual block conditioned on the embedding e, optionally resampling (BigGAN style).

    Main path: GN → SiLU → [resample] → conv → inject e → GN → SiLU → dropout → conv (zero-init).
    With ``use_scale_shift_norm`` e is injected as adaptive group norm, GN(h)·(1 + scale) + shift
    (the first half of the projected e is the scale); otherwise it is added before the second GN.
    The skip path resamples the raw input and uses a 1×1 conv when the width changes.

    Args:
        channels: input channels C_in.
        emb_channels: width E of e.
        dropout: dropout probability before the last conv.
        out_channels: output channels C_out (default C_in).
        use_scale_shift_norm: inject e as scale and shift of the second GroupNorm.
        use_checkpoint: recompute the block in the backward pass to save memory.
        up: upsample ×2 (nearest) inside the block.
        down: downsample ×2 (2×2 average pool) inside the block.

    Shapes: x [N, C_in, H, W], e [N, E] -> [N, C_out, H', W'].
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float,
        out_channels: int | None = None,
        use_scale_shift_norm: bool = False,
        use_checkpoint: bool = False,
        up: bool = False,
        down: bool = False,
    ):
        super().__init__()
        if up and down:
            raise ValueError("a ResBlock resamples up or down, not both")
        out_channels = out_channels or channels
        self.channels = channels
        self.out_channels = out_channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.use_checkpoint = use_checkpoint
        self.resample = "up" if up else "down" if down else None
        self.in_layers = nn.Sequential(
            normalization(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        emb_out = 2 * out_channels if use_scale_shift_norm else out_channels
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, emb_out))
        self.out_layers = nn.Sequential(
            normalization(out_channels),
            nn.SiLU(),
            ExampleDropout(dropout),
            zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1)),
        )
        if out_channels == channels:
            self.skip_connection = nn.Identity()
        else:
            self.skip_connection = nn.Conv2d(channels, out_channels, 1)

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.resample == "up":
            if torch.compiler.is_compiling():
                # Inductor lowers the interpolation's backward to a scatter-add (~7 ms of a
                # ~325 ms bf16 training step on the benchmark model, 2-core CPU); a broadcast's
                # backward is a sum that it fuses. Eagerly, the interpolation kernel is faster.
                n, c, h, w = x.shape
                x = x[:, :, :, None, :, None].expand(n, c, h, 2, w, 2)
                return x.reshape(n, c, 2 * h, 2 * w)
            return F.interpolate(x, scale_factor=2, mode="nearest")
        if self.resample == "down":
            return F.avg_pool2d(x, kernel_size=2, stride=2)
        return x

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return _maybe_checkpoint(self._forward, self.use_checkpoint, x, emb)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.resample is None:
            h = self.in_layers(x)
        else:
            # Resample between the activation and the conv, as the released weights expect.
            norm_act, conv = self.in_layers[:-1], self.in_layers[-1]
            if self.resample == "up":
                h = upsample_conv(norm_act(x), conv)
            else:
                h = conv(self._resample(norm_act(x)))
            x = self._resample(x)
        emb_out = self.emb_layers(emb)
        if self.use_scale_shift_norm:
            norm, rest = self.out_layers[0], self.out_layers[1:]
            scale, shift = emb_out.chunk(2, dim=1)
            h = rest(norm.modulated(h, scale, shift))
        else:
            h = self.out_layers(h + emb_out.to(h.dtype)[..., None, None])
        return self.skip_connection(x) + h


def heads_for(channels: int, num_heads: int, num_head_channels: int | None) -> int:
    """Number of heads: C // num_head_channels when that is set, otherwise ``num_heads``."""
    if num_head_channels is None:
        if channels % num_heads:
            raise ValueError(f"{channels} channels are not divisible by {num_heads} heads")
        return num_heads
    if channels % num_head_channels:
        raise ValueError(
            f"q,k,v channels {channels} are not divisible by num_head_channels {num_head_channels}"
        )
    return channels // num_head_channels


class AttentionBlock(nn.Module):
    """Spatial self-attention with a residual connection: x + proj_out(attn(qkv(GN(x)))).

    Args:
        channels: C.
        num_heads: heads, used when ``num_head_channels`` is None.
        num_head_channels: channels per head c; overrides ``num_heads`` when set.
        new_order: qkv channel layout, see :func:`qkv_attention`.
        use_checkpoint: recompute the block in the backward pass. (The original checkpoints its
            attention blocks always, whatever its flag says, which breaks double backward; here
            the flag is honoured for attention as for ResBlocks.)

    Shapes: [N, C, H, W] -> [N, C, H, W].
    """

    def __init__(
        self,
        channels: int,
        num_heads: int = 1,
        num_head_channels: int | None = None,
        new_order: bool = False,
        use_checkpoint: bool = False,
    ):
        super().__init__()
        self.channels = channels
        self.num_heads = heads_for(channels, num_heads, num_head_channels)
        self.new_order = new_order
        self.use_checkpoint = use_checkpoint
        self.norm = normalization(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = zero_module(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _maybe_checkpoint(self._forward, self.use_checkpoint, x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels = x.shape[:2]
        # reshape, not view: the input may be channels_last.
        tokens = x.reshape(batch, channels, -1)
        h = qkv_attention(self.qkv(self.norm(tokens)), self.num_heads, self.new_order)
        return (tokens + self.proj_out(h)).reshape(x.shape)


class AttentionPool2d(nn.Module):
    """CLIP-style attention pooling: the mean token attends over all positions (new qkv order).

    Args:
        spatial_size: S, side of the incoming feature map.
        embed_dim: C.
        num_head_channels: channels per head (heads = C // num_head_channels).
        output_dim: width of the pooled output.

    Shapes: [N, C, S, S] -> [N, output_dim].
    """

    def __init__(self, spatial_size: int, embed_dim: int, num_head_channels: int, output_dim: int):
        super().__init__()
        self.positional_embedding = nn.Parameter(
            torch.randn(embed_dim, spatial_size**2 + 1) / embed_dim**0.5
        )
        self.qkv_proj = nn.Conv1d(embed_dim, 3 * embed_dim, 1)
        self.c_proj = nn.Conv1d(embed_dim, output_dim, 1)
        self.num_heads = heads_for(embed_dim, 1, num_head_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels = x.shape[:2]
        tokens = x.reshape(batch, channels, -1)
        tokens = torch.cat([tokens.mean(dim=-1, keepdim=True), tokens], dim=-1)
        tokens = tokens + self.positional_embedding[None].to(tokens.dtype)
        h = qkv_attention(self.qkv_proj(tokens), self.num_heads, new_order=True)
        return self.c_proj(h)[:, :, 0]
