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

    python benchmarks/init_quality.py --bpw 1.0,0.55 --inits dual-svid,itq,itq-refined
    python benchmarks/init_quality.py --bpw 1.0 --inits itq-refined --grad-powers 0,0.5,1 \\
        --name init_quality_grad_cpu
"""

from __future__ import annotations

import argparse
import time

import common
import torch

from littlebit.config import LittleBitConfig
from littlebit.core.calibrate import input_rms
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


def score(teacher, calib, ids, rms, bpw: float, init: str, power: float, windows: int) -> dict:
    device = calib.device.type
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    lb = LittleBitConfig(bpw=bpw, init=init)
    student = make_student(teacher, lb, calib, progress=False, grad_power=power)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        ppl = {n: perplexity(student, x, 2048, windows, progress=False) for n, x in ids.items()}
    return {
        "bpw_target": bpw,
        "init": init,
        "grad_power": power,
        "init_s": round(seconds, 1),
        "weighted_rel_error": round(weighted_error(student, teacher, rms), 4),
        **{f"{n}_ppl": round(v, 1) for n, v in ppl.items()},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bpw", default="1.0,0.55")
    p.add_argument("--inits", default="dual-svid,itq,itq-refined")
    p.add_argument("--windows", type=int, default=4, help="2048-token windows of each test split")
    p.add_argument("--calib-sequences", type=int, default=16)
    p.add_argument("--grad-powers", default="0", help="output-gradient weightings to try (0: none)")
    p.add_argument("--name", default=None, help="results file name (default: init_quality_<device>)")
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    teacher = load_model(None, torch.float32, device)
    tok = load_tokenizer(None)
    ids = {name: tokenize_eval(tok, name, "test") for name in ("wikitext2", "ptb")}
    stream = load_tokens("wikitext2:valid", tok)
    calib = stream[: args.calib_sequences * 512].view(args.calib_sequences, 512).to(device)
    rms = input_rms(teacher, calib)
    powers = [float(x) for x in args.grad_powers.split(",")]
    records = []
    for bpw in (float(b) for b in args.bpw.split(",")):
        for init in args.inits.split(","):
            for power in powers:
                records.append(score(teacher, calib, ids, rms, bpw, init, power, args.windows))
                print(records[-1], flush=True)
    common.write_results(
        args.name or f"init_quality_{device}",
        records,
        windows=args.windows,
        calib_sequences=args.calib_sequences,
        threads=torch.get_num_threads(),
        model="SmolLM2-135M-Instruct",
    )
    print(f"\n{'BPW':>5} {'init':<12} {'grad^':>5} {'init s':>7} {'weighted err':>12}", end="")
    print(f" {'wikitext2':>11} {'ptb':>11}")
    for r in records:
        print(
            f"{r['bpw_target']:>5} {r['init']:<12} {r['grad_power']:>5} {r['init_s']:>7} "
            f"{r['weighted_rel_error']:>12} {r['wikitext2_ppl']:>11} {r['ptb_ppl']:>11}"
        )


if __name__ == "__main__":
    main()
