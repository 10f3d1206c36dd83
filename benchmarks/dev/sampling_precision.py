"""How far the teacher's next-token distribution moves when it runs in 16 bits: the default model in
fp32 against copies of it in bf16 and fp16 (``teacher_text.sampling_twin``, what ``generate-data``
samples with), on the same token windows.

Per dtype, over every position of ``--windows`` windows of ``--seqlen`` tokens of the teacher's own
fp32-sampled text (a ``generate-data`` cache folder): the mean KL divergence
KL(p_fp32 || p_dtype) in nats, the mean entropy of p_dtype against p_fp32's (a flatter distribution
writes text the fp32 teacher finds less likely), and how often the most likely token differs. Writes
``benchmarks/results/<--name>.json``.

    python benchmarks/dev/sampling_precision.py --text DIR --windows 16      # CPU: a few minutes
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from littlebit.hf.models import load_model  # noqa: E402
from littlebit.training.teacher_text import sampling_twin  # noqa: E402


def windows(text: Path, count: int, seqlen: int) -> torch.Tensor:
    shards = sorted(text.glob("shard-*.safetensors"))
    stream = torch.cat([load_file(str(p))["tokens"] for p in shards]).long()
    # evenly spaced over the cache, so that every start kind's shards are in
    step = (stream.numel() - seqlen) // max(1, count - 1)
    return torch.stack([stream[i * step : i * step + seqlen] for i in range(count)])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--text", type=Path, required=True, help="a generate-data cache folder")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--dtypes", default="bfloat16,float16")
    ap.add_argument("--name", default="sampling_precision_cpu")
    args = ap.parse_args()
    model = load_model(None, device="cpu")
    ids = windows(args.text, args.windows, args.seqlen)
    twins = {d: sampling_twin(model, getattr(torch, d)) for d in args.dtypes.split(",")}
    sums = {d: {"kl": 0.0, "entropy_gap": 0.0, "argmax_differs": 0.0} for d in twins}
    entropy_fp32, positions = 0.0, 0
    with torch.no_grad():
        for row in ids:
            ref = torch.log_softmax(model(row[None]).logits[0].float(), -1)
            p = ref.exp()
            h_ref = -(p * ref).sum(-1)
            entropy_fp32 += h_ref.sum().item()
            positions += row.numel()
            for d, twin in twins.items():
                out = torch.log_softmax(twin(row[None]).logits[0].float(), -1)
                s = sums[d]
                s["kl"] += (p * (ref - out)).sum().item()
                s["entropy_gap"] += (-(out.exp() * out).sum(-1) - h_ref).sum().item()
                s["argmax_differs"] += (out.argmax(-1) != ref.argmax(-1)).sum().item()
    records = [
        {"dtype": d, **{k: round(v / positions, 5) for k, v in s.items()}, "positions": positions}
        for d, s in sums.items()
    ]
    for r in records:
        print(r, flush=True)
    print(f"fp32 mean entropy {entropy_fp32 / positions:.4f} nats over {positions} positions")
    common.write_results(
        args.name,
        records,
        text=args.text.name,
        fp32_entropy=round(entropy_fp32 / positions, 4),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
