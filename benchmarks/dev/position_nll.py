"""How a trained model's loss against the FP model's depends on the position in the window: over
the first ``--windows`` windows of 2048 tokens of WikiText-2 and PTB test, the perplexity of each band
of positions (0-63, 64-255, 256-511, 512-1023, 1024-2047) for a LittleBit directory and for the FP
model, and their ratio. Training runs at 512 tokens a sequence and evaluation at 2048: a ratio that
jumps past position 512, where it was flat before, points at the positions training never saw; one
that grows from the first positions on, at how the model uses its context. Prints a table and writes
``benchmarks/results/<--name>.json``.

    python benchmarks/dev/position_nll.py --model DIR      # CPU, 4 windows: a few minutes
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402
import torch  # noqa: E402

SEQLEN = 2048
BANDS = ((0, 64), (64, 256), (256, 512), (512, 1024), (1024, 2048))


@torch.no_grad()
def band_nll(model, ids: torch.Tensor, windows: int) -> list[float]:
    """Mean next-token NLL of each band of predicted positions (position p predicts token p + 1)."""
    sums = torch.zeros(SEQLEN - 1, dtype=torch.float64)
    for i in range(windows):
        window = ids[:, i * SEQLEN : (i + 1) * SEQLEN]
        logits = model(window, use_cache=False).logits[0, :-1].float()
        sums += torch.nn.functional.cross_entropy(logits, window[0, 1:], reduction="none").double().cpu()
    return [sums[lo : min(hi, SEQLEN - 1)].mean().item() / windows for lo, hi in BANDS]


def main() -> int:
    from littlebit.evaluation.perplexity import tokenize_eval
    from littlebit.hf.checkpoint import load_compressed
    from littlebit.hf.models import load_model, load_tokenizer

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="a LittleBit directory")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--name", default="position_nll_cpu")
    args = ap.parse_args()
    tokenizer = load_tokenizer(None)
    models = {
        "fp": load_model(None, torch.float32, "cpu").eval(),
        "littlebit": load_compressed(args.model, device="cpu", dtype=torch.float32).eval(),
    }
    records = []
    print(f"{'text':<10} {'positions':<11} {'FP ppl':>8} {'ppl':>9} {'ratio':>7}")
    for text in ("wikitext2", "ptb"):
        ids = tokenize_eval(tokenizer, text)
        nll = {name: band_nll(m, ids, args.windows) for name, m in models.items()}
        for (lo, hi), fp, lb in zip(BANDS, nll["fp"], nll["littlebit"], strict=True):
            rec = {"text": text, "positions": [lo, hi], "fp_ppl": math.exp(fp), "ppl": math.exp(lb)}
            rec["ratio"] = rec["ppl"] / rec["fp_ppl"]
            records.append(rec)
            band = f"{lo:>4}-{hi - 1:<6}"
            print(f"{text:<10} {band} {rec['fp_ppl']:8.2f} {rec['ppl']:9.2f} {rec['ratio']:7.2f}")
    path = common.write_results(args.name, records, model=args.model, windows=args.windows, seqlen=SEQLEN)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
