"""MONAI's Generator and Discriminator built from the config, initialised as the seed bundle does."""

from __future__ import annotations

import functools
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from monai.networks import normal_init
from monai.networks.nets import Discriminator, Generator

from .config import ModelConfig


def build_generator(cfg: ModelConfig, init: bool = True) -> Generator:
    """The bundle's generator with its output Sigmoid as ``conv.activation`` (no parameters, same keys)."""
    net = Generator(
        latent_shape=cfg.latent_size,
        start_shape=list(cfg.start_shape),
        channels=list(cfg.g_channels),
        strides=list(cfg.g_strides),
    )
    if init:
        net.apply(normal_init)
    net.conv.add_module("activation", torch.nn.Sigmoid())
    return net


class MaskDropout(torch.nn.Dropout):
    """Dropout drawn as ``rand_like(x) >= p``: the same distribution as ``nn.Dropout``, about twice as
    fast on CPU (PyTorch's CPU ``bernoulli_`` is slow), but other random masks than PyTorch's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        # One float mask holding 0 or 1/(1-p), built in place: no bool tensor, no conversion copy.
        return x * torch.rand_like(x).ge_(self.p).mul_(1.0 / (1.0 - self.p))


def _replace_modules(module: torch.nn.Module, replacement: Callable[[torch.nn.Module], Optional[torch.nn.Module]]) -> None:
    """Swap each descendant for which ``replacement`` returns a module; look inside the others."""
    for name, child in module.named_children():
        new = replacement(child)
        if new is not None:
            setattr(module, name, new)
        else:
            _replace_modules(child, replacement)


def _as_mask_dropout(module: torch.nn.Module) -> Optional[MaskDropout]:
    return MaskDropout(module.p) if type(module) is torch.nn.Dropout else None


@functools.lru_cache(maxsize=None)
def _phase_taps(kernel: int, padding: int) -> tuple[torch.Tensor, int, int]:
    """Where each tap of the phase kernel comes from in the flattened k x k kernel (k*k = a zero).

    The input gradient of a stride-2 convolution is out[2m + a] = sum_t grad[m + t] * w[a + padding - 2t]
    along each axis (a = 0, 1 the output phase): for each phase a stride-1 correlation over taps
    t = t0 .. t1. Returns the index tensor (2, 2, T, T) and the padding (-t0, t1) around grad.
    """
    t0 = min(-((kernel - 1 - a - padding) // 2) for a in (0, 1))
    t1 = max((a + padding) // 2 for a in (0, 1))
    taps = range(t0, t1 + 1)
    along = [[a + padding - 2 * t if 0 <= a + padding - 2 * t < kernel else None for t in taps] for a in (0, 1)]
    index = [[[[kernel * kernel if kh is None or kw is None else kh * kernel + kw for kw in along[b]] for kh in along[a]]
               for b in (0, 1)] for a in (0, 1)]
    return torch.tensor(index), -t0, t1


class _PhaseSplitConv(torch.autograd.Function):
    """A stride-2 convolution whose input gradient is one stride-1 convolution and a pixel shuffle.

    oneDNN's strided backward-data is slow on CPU for few input channels (64x64x1 inputs: 73 ms vs 26 ms
    per 300 images; 32x32x8: 29 vs 22 ms); the weight and bias gradients stay PyTorch's. Ops in the
    backward are differentiable, so R1's double backward works through it.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, padding):
        device = x.device.type
        if torch.is_autocast_enabled(device):  # cast as autocast casts conv2d, and save what the backward needs
            dtype = torch.get_autocast_dtype(device)
            x, weight, bias = x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)
        ctx.save_for_backward(x, weight)
        ctx.padding, ctx.has_bias = padding, bias is not None
        with torch.autocast(device, enabled=False):
            return F.conv2d(x, weight, bias, 2, padding)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_x = grad_w = grad_b = None
        if need_x:
            index, before, after = _phase_taps(weight.shape[-1], ctx.padding)
            cout, cin = weight.shape[:2]
            flat = torch.cat([weight.flatten(2), weight.new_zeros(cout, cin, 1)], dim=2)
            taps = index.shape[-1]
            phases = flat[:, :, index.to(weight.device).flatten()].reshape(cout, cin, 4, taps, taps)
            phases = phases.permute(1, 2, 0, 3, 4).reshape(4 * cin, cout, taps, taps)
            padded = grad if before == after else F.pad(grad, (before, after, before, after))
            phase_out = F.conv2d(padded, phases.contiguous(memory_format=torch.channels_last), None, 1,
                                 before if before == after else 0)
            grad_x = F.pixel_shuffle(phase_out, 2)
        if need_w or need_b:
            _, grad_w, grad_b = torch.ops.aten.convolution_backward(
                grad, x, weight, [weight.shape[0]] if ctx.has_bias else None, [2, 2], [ctx.padding] * 2, [1, 1],
                False, [0, 0], 1, [False, need_w, need_b and ctx.has_bias])
        return grad_x, grad_w, grad_b, None


class PhaseSplitConv2d(torch.nn.Conv2d):
    """``Conv2d`` (stride 2, odd square kernel, 'same' padding) with ``_PhaseSplitConv``'s input gradient;
    the same parameters and state_dict. Other inputs (odd sizes) take the plain path."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % 2 or x.shape[-2] % 2:
            return super().forward(x)
        return _PhaseSplitConv.apply(x, self.weight, self.bias, self.padding[0])


def _as_phase_split(module: torch.nn.Module, max_in_channels: int = 8) -> Optional[PhaseSplitConv2d]:
    """The ``PhaseSplitConv2d`` twin of a stride-2, odd-square-kernel, 'same'-padded ``Conv2d`` with few inputs."""
    if type(module) is not torch.nn.Conv2d:
        return None
    k = module.kernel_size[0]
    if not (k % 2 and module.kernel_size == (k, k) and module.stride == (2, 2) and module.padding == (k // 2, k // 2)
            and module.dilation == (1, 1) and module.groups == 1 and module.padding_mode == "zeros"
            and module.in_channels <= max_in_channels):
        return None
    fast = PhaseSplitConv2d(module.in_channels, module.out_channels, k, 2, k // 2, bias=module.bias is not None)
    fast.load_state_dict(module.state_dict())
    return fast


def build_discriminator(cfg: ModelConfig, init: bool = True, mask_dropout: bool = False,
                        phase_split: bool = False) -> Discriminator:
    """The bundle's discriminator, returning logits (``last_act=None``) so the losses are autocast-safe.

    ``mask_dropout`` swaps its dropout layers for ``MaskDropout`` and ``phase_split`` its stride-2
    convolutions of up to 8 input channels for ``PhaseSplitConv2d`` (CPU speedups; the same parameters
    and state_dict).
    """
    net = Discriminator(
        in_shape=list(cfg.image_shape),
        channels=list(cfg.d_channels),
        strides=list(cfg.d_strides),
        num_res_units=cfg.d_num_res_units,
        kernel_size=cfg.d_kernel_size,
        dropout=cfg.d_dropout,
        last_act=None,
    )
    if init:
        net.apply(normal_init)
    if mask_dropout:
        _replace_modules(net, _as_mask_dropout)
    if phase_split:
        _replace_modules(net, _as_phase_split)
    return net
