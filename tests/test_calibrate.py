"""Calibration statistics and the weighted initialisation they feed."""

import pytest
import torch
from conftest import tiny_model

from littlebit import LittleBitConfig, LittleBitLinear
from littlebit.core.calibrate import input_rms, linear_input_squares, output_grad_rms
from littlebit.core.convert import SplitLinear, convert, decoder_linear_names
from littlebit.core.init import initialise
from littlebit.training.student import make_student


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _direct_output_grad_rms(model, ids, batch_size):
    """The same statistic the slow way: every linear's output retained, its .grad read."""
    names = decoder_linear_names(model)
    sums, count, outs = {}, 0, {}
    for i in range(0, ids.shape[0], batch_size):
        outs.clear()
        hooks = [
            model.get_submodule(n).register_forward_hook(
                lambda m, a, o, n=n: (o.retain_grad(), outs.__setitem__(n, o))[0]
            )
            for n in names
        ]
        for p in model.parameters():
            p.requires_grad_(True)
        batch = ids[i : i + batch_size]
        # the summed next-token loss: mean times the predicted tokens
        (model(batch, labels=batch, use_cache=False).loss * batch.shape[0] * (batch.shape[1] - 1)).backward()
        for h in hooks:
            h.remove()
        for n, o in outs.items():
            sums[n] = sums.get(n, 0) + o.grad.double().reshape(-1, o.shape[-1]).square().sum(0)
        count += batch.numel()
    model.zero_grad(set_to_none=True)
    for p in model.parameters():
        p.requires_grad_(False)
    return {n: (s / count).sqrt().float() for n, s in sums.items()}


@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_output_grad_rms_is_the_loss_gradient_at_each_output(arch):
    model = tiny_model(arch, seed=int(torch.randint(0, 1000, ())))
    ids = torch.randint(0, model.config.vocab_size, (5, 12))
    for p in model.parameters():
        p.requires_grad_(False)
    got = output_grad_rms(model, ids, batch_size=2)
    want = _direct_output_grad_rms(model, ids, batch_size=2)
    assert set(got) == set(decoder_linear_names(model))
    for name, value in want.items():
        assert torch.allclose(got[name], value, rtol=1e-4, atol=1e-12), name
        assert (got[name] > 0).all(), name


def test_output_grad_rms_leaves_parameter_gradients_alone():
    model = tiny_model("llama")
    ids = torch.randint(0, model.config.vocab_size, (2, 10))
    for p in model.parameters():
        p.requires_grad_(True)  # a model someone was training: its .grad must stay as it was
    output_grad_rms(model, ids)
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())
    # the hooks are gone: a later forward records nothing and runs without a graph leaf swap
    with torch.no_grad():
        model(ids)


def test_output_scale_weights_the_fit_and_undoes_itself_on_h():
    torch.manual_seed(int(torch.randint(0, 1000, ())))
    w = torch.randn(64, 80)
    o = torch.ones(64)
    o[:6] = 40.0  # a few outputs that move the loss far more than the rest
    plain = initialise(w, 16, method="itq").weight()
    weighted = initialise(w, 16, method="itq", output_scale=o).weight()
    assert rel(o[:, None] * weighted, o[:, None] * w) < rel(o[:, None] * plain, o[:, None] * w)
    # the fit of diag(o) W, with h divided by o, is the fit of W weighted by o
    f = initialise(w, 16, method="dual-svid", output_scale=o)
    g = initialise(o[:, None] * w, 16, method="dual-svid")
    assert torch.allclose(f.h * o, g.h, rtol=1e-5)
    assert torch.equal(f.u, g.u) and torch.equal(f.v, g.v)
    # a constant weight changes nothing: the fit is invariant to scale
    same = initialise(w, 16, method="itq-refined", output_scale=torch.full((64,), 3.0)).weight()
    assert torch.allclose(same, initialise(w, 16, method="itq-refined").weight(), rtol=1e-4, atol=1e-6)


def test_fused_parts_take_their_own_rows_of_the_output_scale():
    model = tiny_model("phi3")
    name = "model.layers.0.self_attn.qkv_proj"
    w = model.get_submodule(name).weight.detach().clone()
    o = torch.rand(w.shape[0]) + 0.5
    cfg = LittleBitConfig(bpw=4.0, init="dual-svid")
    convert(model, cfg, progress=False, output_scales=lambda n: o if n == name else None)
    fused = model.get_submodule(name)
    assert isinstance(fused, SplitLinear)
    start = 0
    for part in fused.parts.values():
        assert isinstance(part, LittleBitLinear)
        rows = slice(start, start + part.out_features)
        want = initialise(o[rows, None] * w[rows], part.rank, method="dual-svid", seed=cfg.seed + 1)
        # layer 0's qkv is the second module converted (seed offset 1)
        assert torch.allclose(part.h.detach() * o[rows], want.h, rtol=1e-5), rows
        start += part.out_features


def test_make_student_with_grad_power_fits_the_gradient_weighted_weight():
    teacher = tiny_model("llama")
    ids = torch.randint(0, teacher.config.vocab_size, (4, 16))
    cfg = LittleBitConfig(bpw=2.0, init="itq")
    plain = make_student(teacher, cfg, ids, act_power=1.0, progress=False)
    weighted = make_student(teacher, cfg, ids, act_power=1.0, progress=False, grad_power=1.0)
    grads = output_grad_rms(teacher, ids)
    rms = input_rms(teacher, ids)
    better = 0
    for name in decoder_linear_names(teacher):
        w = teacher.get_submodule(name).weight.detach()
        o, a = grads[name][:, None], rms[name][None, :]
        errs = [rel(o * m.get_submodule(name).factors().weight() * a, o * w * a) for m in (plain, weighted)]
        better += errs[1] < errs[0]
    assert better >= 0.8 * len(decoder_linear_names(teacher))


def test_the_gradient_pass_records_the_same_input_rms():
    """make_student takes both statistics from the gradient pass's forward."""
    model = tiny_model("llama", seed=int(torch.randint(0, 1000, ())))
    ids = torch.randint(0, model.config.vocab_size, (5, 16))
    want = input_rms(model, ids)
    with linear_input_squares(model) as squares:
        output_grad_rms(model, ids)
    got = squares.rms(ids.numel())
    assert set(got) == set(want)
    for name, value in want.items():
        assert torch.allclose(got[name], value, rtol=1e-5), name
