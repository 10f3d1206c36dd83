"""How alike two caches of the teacher's text are: per start kind, the documents' lengths, how many end
at the end token, how repetitive they are, and the fp32 teacher's loss on them.

Text sampled from the teacher at temperature 1 scores about the entropy of the teacher's own
distribution under it; text sampled from a less precise copy of the teacher (bf16) scores higher by
as much as that copy's distribution drifted. Counts every document of each cache folder
(``littlebit generate-data`` writes them; the folder holding ``settings.json``): per start kind, how
many, their mean length and the share ended by the end token. Then reads ``--docs`` documents of each
start kind, evenly spaced over its first shard, scores the sampled tokens (not the start prompt) with
the default model in fp32, and writes ``benchmarks/results/<--name>.json``.

    python benchmarks/dev/text_stats.py DIR_A DIR_B --docs 192     # CPU: about 30 minutes
    python benchmarks/dev/text_stats.py DIR_A DIR_B --docs 0       # the counts alone, seconds
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402
import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402

from littlebit.hf.models import load_model  # noqa: E402


def documents(folder: Path, per_kind: int) -> tuple[dict, dict[str, list[torch.Tensor]]]:
    """The cache's settings and ``per_kind`` documents of each start kind, evenly spaced over the first
    shard of that kind (a chat shard holds its unanswered questions first)."""
    settings = json.loads((folder / "settings.json").read_text())
    docs: dict[str, list[torch.Tensor]] = {}
    for shard in sorted(folder.glob("shard-*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            kind = f.metadata()["start"]
            if kind in docs:
                continue
            tokens, lengths = f.get_tensor("tokens").long(), f.get_tensor("lengths").tolist()
        every = torch.split(tokens, lengths)
        picks = torch.linspace(0, len(every) - 1, min(per_kind, len(every))).round().long().tolist()
        docs[kind] = [every[i] for i in picks]
        if len(docs) == len(settings["prompts"]):
            break
    return settings, docs


def every_document(folder: Path, eos: int) -> list[dict]:
    """Per start kind, over every shard: documents, mean length, share ended by the end token."""
    kinds: dict[str, list] = {}
    for shard in sorted(folder.glob("shard-*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            kind, tokens, lengths = f.metadata()["start"], f.get_tensor("tokens"), f.get_tensor("lengths")
        ended = tokens[torch.cumsum(lengths.long(), 0) - 1] == eos
        k = kinds.setdefault(kind, [0, 0, 0])
        k[0], k[1], k[2] = k[0] + len(lengths), k[1] + int(lengths.sum()), k[2] + int(ended.sum())
    return [
        {"cache": folder.name, "start": kind, "all_documents": n, "mean_tokens": round(t / n, 1),
         "ended_by_eos": round(e / n, 3)}
        for kind, (n, t, e) in kinds.items()
    ]  # fmt: skip


def repeated_4grams(doc: torch.Tensor) -> float:
    grams = [tuple(doc[i : i + 4].tolist()) for i in range(len(doc) - 3)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dirs", nargs="+", type=Path, help="cache folders (each holding settings.json)")
    ap.add_argument("--docs", type=int, default=48, help="documents of each start kind scored (0: none)")
    ap.add_argument("--name", default="text_stats")
    args = ap.parse_args()
    model = load_model(None, device="cpu") if args.docs else None
    records = []
    for folder in args.dirs:
        settings, docs = documents(folder, args.docs)
        eos = settings["eos"]
        for rec in every_document(folder, eos):
            records.append({**rec, "sampling_dtype": settings["generation"].get("dtype", "float32")})
            print(records[-1], flush=True)
        if not args.docs:
            continue
        for kind, mine in docs.items():
            start = len(settings["prompts"][kind]) + (1 if kind == "random" else 0)
            nll, count = 0.0, 0
            with torch.no_grad():
                for doc in mine:
                    if len(doc) <= start + 1:
                        continue
                    logits = model(doc[None]).logits[0, start - 1 : -1].float()
                    nll += torch.nn.functional.cross_entropy(logits, doc[start:], reduction="sum").item()
                    count += len(doc) - start
            rec = {
                "cache": folder.name,
                "sampling_dtype": settings["generation"].get("dtype", "float32"),
                "start": kind,
                "documents": len(mine),
                "mean_tokens": round(statistics.mean(len(d) for d in mine), 1),
                "ended_by_eos": round(sum(int(d[-1]) == eos for d in mine) / len(mine), 3),
                "repeated_4grams": round(statistics.mean(repeated_4grams(d) for d in mine), 4),
                "teacher_nll": round(nll / count, 4),
                "teacher_ppl": round(math.exp(nll / count), 2),
                "scored_tokens": count,
            }
            records.append(rec)
            print(rec, flush=True)
    common.write_results(args.name, records, docs_per_kind=args.docs, scorer="SmolLM2-135M-Instruct, fp32")
    return 0


if __name__ == "__main__":
    sys.exit(main())
