"""Building the student: a full-precision copy of the teacher, converted and ready to train."""

from __future__ import annotations

import copy

import torch
from torch import nn

from littlebit.config import LittleBitConfig
from littlebit.core.calibrate import input_rms, linear_input_squares, output_grad_rms, scale_function
from littlebit.core.convert import convert
from littlebit.training.optim import littlebit_modules


def make_student(
    teacher: nn.Module,
    config: LittleBitConfig,
    calibration: torch.Tensor | None = None,
    act_power: float = 1.0,
    latent_rms: float | None = None,
    progress: bool = True,
    grad_power: float = 0.0,
) -> nn.Module:
    """Copy ``teacher`` in fp32, convert it, and rescale its latents (the teacher is untouched).

    ``calibration`` (n, seqlen) token ids turn on the weighted initialisation: input scales
    ``rms ** act_power`` (activation RMS) and output scales ``rms ** grad_power`` (the loss
    gradient's RMS at each output); None, or both powers 0, fits the weights alone.
    """
    student = cast_floating(copy.deepcopy(teacher), torch.float32)
    scales = out_scales = None
    if calibration is not None and calibration.numel():
        if grad_power != 0:  # its forward pass records the inputs too
            with linear_input_squares(teacher) as squares:
                out_scales = scale_function(output_grad_rms(teacher, calibration), grad_power)
            in_rms = squares.rms(calibration.numel())
        else:
            in_rms = input_rms(teacher, calibration) if act_power != 0 else {}
        if act_power != 0:
            scales = scale_function(in_rms, act_power)
    device = next(student.parameters()).device
    convert(student, config, device, input_scales=scales, progress=progress, output_scales=out_scales)
    if latent_rms is not None:
        rescale_latents(student, latent_rms)
    return student


def cast_floating(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast the floating-point parameters in place; buffers keep their precision.

    Not ``.to(dtype)``: transformers refuses dtype casts of models it loaded from GGUF (it marks
    them quantized, though their tensors are plain dequantized floats), and it would also round
    buffers such as the rotary frequencies, which bf16 cannot hold precisely enough.
    """
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)
    return model


@torch.no_grad()
def rescale_latents(model: nn.Module, rms: float) -> None:
    """Scale each path's latent factors to RMS ``rms``; the signs, hence the model, do not change.

    Only signs reach the forward pass, so a latent's size only decides how easily it flips: the
    SmoothSign gradient vanishes for ``|x| >> 1/alpha``, and Adam's step is an absolute size. After
    SVD the latents' size varies from layer to layer with the singular values; a common RMS puts every
    layer at the same distance from flipping relative to the learning rate.
    """
    for _, m in littlebit_modules(model):
        for latent in (m.u, m.v):
            cur = latent.square().mean(dim=(1, 2), keepdim=True).sqrt().clamp_min(1e-12)
            latent.mul_(rms / cur)
