"""How good each initialisation is before any training, on the default model.

For every (BPW, init) the student is built with ``make_student`` as training builds it (two paths,
activation-aware: input RMS from 16 calibration sequences of 512 tokens of WikiText-2 validation
text), then scored without training: WikiText-2 and PTB test perplexity over the first
``--windows`` windows of 2048 tokens, the mean over layers of the activation-weighted relative error
of the binary product |(W - W_hat) diag(rms)|_F / |W diag(rms)|_F, and the seconds the
initialisation took (calibration included). Writes ``benchmarks/results/init_quality_<device>.json``.

``--grad-powers`` also tries weighting each output row by the RMS of the teacher's gradient at that
output (next-token loss on the calibration sequences: a diagonal Fisher estimate) to that power
(``make_student(grad_power=...)``, ``littlebit train --grad-power``): the factors are fitted to
diag(o) W diag(rms) and h is divided by o afterwards. The initialisation time includes both passes.

``--input-covariance off,on`` also tries refitting each layer to its outputs on the calibration tokens
(``make_student(input_covariance=True)``, ``littlebit train --input-covariance``, ``itq-refined``
only). Every record also carries the output error the refit aims at, the mean over layers of
sqrt(tr(E C E^T) / tr(W C W^T)) with E = W - W_hat and C the second moment of the layer's inputs on
the calibration tokens.

    python benchmarks/init_quality.py --bpw 1.0,0.55 --inits dual-svid,itq,itq-refined
    python benchmarks/init_quality.py --bpw 1.0 --inits itq-refined --grad-powers 0,0.5,1 \\
        --name init_quality_grad_cpu
    python benchmarks/init_quality.py --bpw 1.0,0.55 --inits itq-refined --grad-powers 0.5 \\
        --input-covariance off,on --name init_quality_covariance_cpu
"""

from __future__ import annotations

import argparse
import time

import common
import torch

from littlebit.config import LittleBitConfig
from littlebit.core.calibrate import linear_input_second_moments, run_forwards
from littlebit.core.layer import LittleBitLinear
from littlebit.evaluation.perplexity import perplexity, tokenize_eval
from littlebit.hf.models import load_model, load_tokenizer
from littlebit.training.stream import load_tokens
from littlebit.training.student import make_student


def weighted_error(student, teacher, rms: dict[str, torch.Tensor]) -> float:
    """Mean over the converted layers of the input-RMS-weighted relative error of the binary product."""
    dense = dict(teacher.named_modules())
    errors = []
    for name, m in student.named_modules():
        if isinstance(m, LittleBitLinear):
            w = dense[name].weight.detach().float()
            scale = rms[name].to(w)
            errors.append((((w - m.factors().weight()) * scale).norm() / (w * scale).norm()).item())
    return sum(errors) / len(errors)


def output_error(student, teacher, moments) -> float:
    """Mean over the converted layers of the relative error of their outputs on the calibration
    inputs: sqrt(tr(E C E^T) / tr(W C W^T)), E = W - W_hat, C the inputs' second moment."""
    dense = dict(teacher.named_modules())
    errors = []
    for name, m in student.named_modules():
        if isinstance(m, LittleBitLinear):
            w = dense[name].weight.detach().float()
            c = moments(name).to(w)
            e = w - m.factors().weight()
            errors.append((torch.trace(e @ c @ e.T) / torch.trace(w @ c @ w.T)).sqrt().item())
    return sum(errors) / len(errors)


def score(teacher, calib, ids, moments, bpw, init, power, covariance, windows) -> dict:
    device = calib.device.type
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    lb = LittleBitConfig(bpw=bpw, init=init)
    student = make_student(teacher, lb, calib, progress=False, grad_power=power, input_covariance=covariance)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        ppl = {n: perplexity(student, x, 2048, windows, progress=False) for n, x in ids.items()}
    return {
        "bpw_target": bpw,
        "init": init,
        "grad_power": power,
        "input_covariance": covariance,
        "init_s": round(seconds, 1),
        "weighted_rel_error": round(weighted_error(student, teacher, moments.rms()), 4),
        "output_rel_error": round(output_error(student, teacher, moments), 4),
        **{f"{n}_ppl": round(v, 1) for n, v in ppl.items()},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bpw", default="1.0,0.55")
    p.add_argument("--inits", default="dual-svid,itq,itq-refined")
    p.add_argument("--windows", type=int, default=4, help="2048-token windows of each test split")
    p.add_argument("--calib-sequences", type=int, default=16)
    p.add_argument("--grad-powers", default="0", help="output-gradient weightings to try (0: none)")
    p.add_argument("--input-covariance", default="off", help="off, on or off,on: refit to the outputs")
    p.add_argument("--name", default=None, help="results file name (default: init_quality_<device>)")
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    teacher = load_model(None, torch.float32, device)
    tok = load_tokenizer(None)
    ids = {name: tokenize_eval(tok, name, "test") for name in ("wikitext2", "ptb")}
    stream = load_tokens("wikitext2:valid", tok)
    calib = stream[: args.calib_sequences * 512].view(args.calib_sequences, 512).to(device)
    with linear_input_second_moments(teacher) as moments:
        run_forwards(teacher, calib)
    powers = [float(x) for x in args.grad_powers.split(",")]
    covariances = [{"off": False, "on": True}[x] for x in args.input_covariance.split(",")]
    records = []
    for bpw in (float(b) for b in args.bpw.split(",")):
        for init in args.inits.split(","):
            for power in powers:
                for cov in covariances:
                    if cov and init != "itq-refined":
                        continue
                    records.append(score(teacher, calib, ids, moments, bpw, init, power, cov, args.windows))
                    print(records[-1], flush=True)
    common.write_results(
        args.name or f"init_quality_{device}",
        records,
        windows=args.windows,
        calib_sequences=args.calib_sequences,
        threads=torch.get_num_threads(),
        model="SmolLM2-135M-Instruct",
    )
    print(f"\n{'BPW':>5} {'init':<12} {'grad^':>5} {'cov':>4} {'init s':>7} {'weighted err':>12}", end="")
    print(f" {'output err':>10}", end="")
    print(f" {'wikitext2':>11} {'ptb':>11}")
    for r in records:
        print(
            f"{r['bpw_target']:>5} {r['init']:<12} {r['grad_power']:>5} "
            f"{'on' if r['input_covariance'] else 'off':>4} "
            f"{r['init_s']:>7} {r['weighted_rel_error']:>12} {r['output_rel_error']:>10} "
            f"{r['wikitext2_ppl']:>11} {r['ptb_ppl']:>11}"
        )


if __name__ == "__main__":
    main()
