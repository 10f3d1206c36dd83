"""Where a hidden state's size sits: for each decoder layer of the default model (FP teacher, fp32,
CPU), the share of the output's squared norm held by its largest token and by its 4 largest channels,
over one ``--tokens``-token WikiText-2 validation sequence. Behind the block stage's error
(``training.blockwise.fit_layer``): from the middle layers on, the first position (the attention
sink) holds nearly all of it. Prints one line per layer and writes ``benchmarks/results/<--name>.json``.

    python benchmarks/dev/hidden_norms.py      # CPU: under a minute
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402
import torch  # noqa: E402


def main() -> int:
    from littlebit.evaluation.data import eval_text
    from littlebit.hf.models import load_model, load_tokenizer

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--name", default="hidden_norms_cpu")
    args = ap.parse_args()
    tokenizer = load_tokenizer(None)
    model = load_model(None, torch.float32, "cpu").eval()
    text = eval_text("wikitext2", "valid")
    ids = tokenizer(text[: 40 * args.tokens], return_tensors="pt").input_ids[:, : args.tokens]
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states[1:]
    records = []
    for layer, h in enumerate(hidden):
        per_token = h[0].float().square().sum(-1)
        per_channel = h[0].float().square().sum(0)
        total = per_token.sum()
        rec = {
            "layer": layer,
            "squared_norm": total.item(),
            "top_token": int(per_token.argmax()),
            "top_token_share": (per_token.max() / total).item(),
            "top_token_over_median": (per_token.max() / per_token.median()).item(),
            "top4_channels_share": (per_channel.topk(4).values.sum() / total).item(),
        }
        records.append(rec)
        print(
            f"layer {layer:2d}: top token {rec['top_token']:3d} holds {rec['top_token_share']:.3f}"
            f" ({rec['top_token_over_median']:.0f}x the median token),"
            f" 4 channels {rec['top4_channels_share']:.3f}",
            flush=True,
        )
    print(common.write_results(args.name, records, tokens=int(ids.shape[1])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
