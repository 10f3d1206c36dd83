"""Sharded distillation (FSDP2): memory per rank and step time of a Llama-shaped run, and the plan.

Runs the library's trainer on a Llama-2-shaped teacher with random weights (built from its config,
nothing downloaded) and a LittleBit student with random latents (the initialisation's SVDs would
take longer than the steps and change nothing a step costs), sharded over the ``torchrun``
processes, one per GPU. Checkpoints are not written (a 7B student's optimizer state is tens of GB).
Rank 0 writes, to ``--out``: per-rank peak and resident GPU memory, the step times and tokens/s,
and the memory plan's arithmetic for the same shape (``plan``), for comparison.

    torchrun --nproc-per-node N benchmarks/fsdp_step.py --out $OUT/fsdp_step.json
    python benchmarks/fsdp_step.py --out x.json            # world size 1, no torchrun needed
    python benchmarks/fsdp_step.py --plan-only --shape llama-2-70b --world 8 --out plan.json

``plan`` is the memory arithmetic per rank (bytes): the teacher in bf16, the student's fp32
parameters, gradients and AdamW moments, all sharded over the ranks; what is unsharded at once (the
current and the prefetched layer of both models, and one layer's fp32 gradients before their
reduce-scatter); and activations with activation checkpointing (each layer's input for both
models, the hidden states the loss compares, the logits in fp32, and one layer's recomputation,
dominated by its sign matrices).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import common  # noqa: F401  (puts src/ on the path)
import torch

from littlebit.config import LittleBitConfig
from littlebit.core.budget import rank_for_bpw
from littlebit.runtime.synthetic import SHAPES, llama_config
from littlebit.training.config import BlockConfig, TrainConfig

GB = 1e9
# --tiny: the sharded path end to end on CPU processes over gloo (tests/test_distributed.py)
TINY = dict(
    hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
    vocab_size=256,
)  # fmt: skip


def _linears(cfg) -> list[tuple[int, int]]:
    """(d_in, d_out) of one decoder layer's linear maps."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    return [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]


def plan(
    shape: str, bpw: float, world: int, batch: int = 1, seqlen: int = 2048, residual: bool = True
) -> dict:
    """Bytes per rank of a sharded step (``batch`` sequences per rank) and whether it fits 141 GB."""
    cfg = llama_config(shape)
    L, H, V, inter = cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size
    layer_dense = sum(a * b for a, b in _linears(cfg))
    ranks = [rank_for_bpw(a, b, bpw, residual) for a, b in _linears(cfg)]
    paths = 2 if residual else 1
    layer_latents = sum(paths * r * (a + b) for r, (a, b) in zip(ranks, _linears(cfg), strict=True))
    layer_scales = sum(paths * (a + b + r) for r, (a, b) in zip(ranks, _linears(cfg), strict=True))
    norms = (2 * L + 1) * H
    embed = 2 * V * H  # embeddings and head, untied, frozen
    teacher_params = L * (layer_dense + 2 * H) + H + embed
    trained = L * (layer_latents + layer_scales) + norms
    tokens = batch * seqlen
    b = {
        "teacher_bf16": 2 * teacher_params / world,
        "student_params_fp32": 4 * (trained + embed) / world,
        "student_grads_fp32": 4 * trained / world,
        "adamw_moments_fp32": 8 * trained / world,
        # all-gathered bf16: current and prefetched layer, student and teacher; fp32 grads of one layer
        "unsharded_layers": 2 * 2 * (layer_latents + layer_dense) + 4 * layer_latents,
        # checkpointed layer inputs + compared hidden states, both models, bf16
        "activations_layer_inputs": 2 * 2 * (L + 1) * tokens * H,
        "activations_logits_fp32": 4 * 4 * tokens * V,
        # one layer recomputed in backward: sign matrices (value and surrogate), MLP intermediates
        "activations_recompute": 2 * 2 * layer_latents + 4 * 2 * tokens * inter,
    }
    total = sum(b.values())
    return {
        "shape": shape,
        "bpw": bpw,
        "world_size": world,
        "sequences_per_rank": batch,
        "seqlen": seqlen,
        "ranks": dict(zip(("q", "k", "v", "o", "gate", "up", "down"), ranks, strict=True)),
        "student_trained_params": trained,
        "teacher_params": teacher_params,
        "bytes_per_rank": {k: round(v) for k, v in b.items()},
        "total_gb_per_rank": total / GB,
        "fits_h200_141gb": total < 141 * GB,
    }


def fewest_gpus(shape: str, bpw: float, batch: int = 1, seqlen: int = 2048) -> int | None:
    """The smallest power-of-two world size whose per-rank plan fits an H200 (None: over 64)."""
    worlds = (1, 2, 4, 8, 16, 32, 64)
    return next((w for w in worlds if plan(shape, bpw, w, batch, seqlen)["fits_h200_141gb"]), None)


def _torchrun_env() -> None:
    # World size 1 without torchrun: the same code path, one process.
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ["MASTER_PORT"] = str(port)


def run(args) -> dict:
    from transformers import LlamaForCausalLM

    from littlebit.training.distributed import Distributed, student_skeleton
    from littlebit.training.sharded_init import local_shard, rebuild_rotary
    from littlebit.training.trainer import Trainer

    class RandomInit(Distributed):
        """Both models built on the meta device and filled with random weights shard by shard after
        sharding, so no rank ever holds either whole (a 70B teacher alone is 138 GB in bf16); random
        latents instead of the SVD initialisation; no checkpoints."""

        def _build_student(self, trainer, fresh):
            return student_skeleton(trainer.teacher, trainer.lb_config)  # on the meta device, as the teacher

        def materialize(self, trainer):
            for i, model in enumerate((trainer.student, trainer.teacher)):
                # FSDP's CPU offload wants the offloaded shards materialised on the CPU
                where = (
                    torch.device("cpu") if model is trainer.teacher and self.offload_teacher else self.device
                )
                gen = torch.Generator(where).manual_seed(1000 + 2 * self.rank + i)
                model.to_empty(device=where)
                with torch.no_grad():
                    for name, p in model.named_parameters():
                        local = local_shard(p)
                        leaf = name.rsplit(".", 1)[-1]
                        if leaf == "l":  # outputs of the teacher's size: paths x r signed sums of d_in
                            local.fill_(0.02 / p.numel() ** 0.5)
                        elif leaf in ("h", "g") or "norm" in name:
                            local.fill_(1.0)
                        else:
                            local.normal_(0.0, 0.02, generator=gen)
                rebuild_rotary(model, self.device)  # on the device where the layers compute

        def save(self, trainer):
            pass

    _torchrun_env()
    d = RandomInit(offload_teacher=args.offload_teacher)
    torch.manual_seed(0)
    overrides = dict(TINY) if args.tiny else {}
    if args.layers:
        overrides["num_hidden_layers"] = args.layers
    cfg = llama_config(args.shape, **overrides)
    t0 = time.perf_counter()
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("meta"):
        teacher = LlamaForCausalLM(cfg)
    torch.set_default_dtype(torch.float32)
    train_cfg = TrainConfig(
        steps=args.steps,
        seqlen=args.seqlen,
        batch_size=args.batch_size * d.world_size,
        blocks=BlockConfig(sequences=0),
        calib_sequences=0,
        act_power=0.0,
        save_every=0,
        eval_every=0,
        grad_checkpoint=not args.no_grad_checkpoint,
        compile=False,
    )
    n_tokens = train_cfg.tokens_per_step * (args.steps + 1)
    data = torch.randint(0, cfg.vocab_size, (n_tokens,), generator=torch.Generator().manual_seed(0))
    lb = LittleBitConfig(bpw=args.bpw)
    work = Path(tempfile.mkdtemp(prefix="fsdp_step_"))
    trainer = Trainer(teacher, data, lb, train_cfg, work, progress=False, distributed=d)
    trainer.setup(False)
    setup_peak = 0.0
    if d.device.type == "cuda":
        torch.cuda.synchronize(d.device)
        setup_peak = torch.cuda.max_memory_allocated(d.device) / GB  # the build and the sharding
        torch.cuda.reset_peak_memory_stats(d.device)
    built = time.perf_counter() - t0
    result = trainer.run()
    steps = (
        [json.loads(line) for line in (work / "train_log.jsonl").read_text().splitlines()]
        if d.is_main
        else []
    )
    mem = torch.zeros(3, dtype=torch.float64, device=d.device)
    if d.device.type == "cuda":
        mem[0] = torch.cuda.max_memory_allocated(d.device)
        mem[1] = torch.cuda.max_memory_reserved(d.device)
        mem[2] = torch.cuda.memory_allocated(d.device)
    gathered = [torch.zeros_like(mem) for _ in range(d.world_size)]
    torch.distributed.all_gather(gathered, mem)
    params = [p for m in (trainer.student, trainer.teacher) for p in m.parameters()]
    local = sum(local_shard(p).numel() for p in params)
    share = torch.tensor([local / sum(p.numel() for p in params)], dtype=torch.float64, device=d.device)
    fractions = [torch.zeros_like(share) for _ in range(d.world_size)]
    torch.distributed.all_gather(fractions, share)
    record = {
        "shape": args.shape,
        "layers": cfg.num_hidden_layers,
        "bpw": args.bpw,
        "world_size": d.world_size,
        "sequences_per_rank": args.batch_size,
        "seqlen": args.seqlen,
        "steps": args.steps,
        "grad_checkpoint": train_cfg.grad_checkpoint,
        "offload_teacher": args.offload_teacher,
        "setup_s": built,
        "setup_peak_allocated_gb_rank0": setup_peak,
        "tokens_per_s": result.tokens_per_s,  # global, after the warm-up steps
        "tokens_per_s_per_gpu": result.tokens_per_s / d.world_size,
        "step_s": [
            train_cfg.tokens_per_step / r["tokens_per_s"] for r in steps if r.get("phase") == "global"
        ],
        "peak_allocated_gb_per_rank": [float(g[0]) / GB for g in gathered],
        "peak_reserved_gb_per_rank": [float(g[1]) / GB for g in gathered],
        "resident_gb_per_rank": [float(g[2]) / GB for g in gathered],
        "loss": [r["loss"] for r in steps if r.get("phase") == "global"],
        # what each rank holds of both models' parameters: its 1/N share, never the whole
        "local_parameter_fraction_per_rank": [float(f) for f in fractions],
        "plan": None if args.tiny else plan(args.shape, args.bpw, d.world_size, args.batch_size, args.seqlen),
    }
    d.close()
    return record


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="llama-2-7b", choices=sorted(SHAPES))
    p.add_argument("--layers", type=int, help="fewer decoder layers (quick checks)")
    p.add_argument("--tiny", action="store_true", help="a 2-layer, 64-wide Llama (CPU checks)")
    p.add_argument("--bpw", type=float, default=0.55)
    p.add_argument("--batch-size", type=int, default=2, help="sequences per rank per step")
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--no-grad-checkpoint", action="store_true")
    p.add_argument("--offload-teacher", action="store_true")
    p.add_argument("--plan-only", action="store_true", help="only the memory arithmetic (no GPU)")
    p.add_argument("--world", type=int, default=8, help="--plan-only: the number of ranks")
    p.add_argument("--out", required=True, help="JSON file to write (rank 0)")
    args = p.parse_args()
    if args.plan_only:
        records = [
            {
                **plan(args.shape, bpw, args.world, args.batch_size, args.seqlen),
                "fewest_h200s": fewest_gpus(args.shape, bpw, args.batch_size, args.seqlen),
            }
            for bpw in (0.1, 0.3, 0.55, 1.0)
        ]
    else:
        records = [run(args)]
        if int(os.environ.get("RANK", "0")) != 0:
            return
    meta = {
        "date": datetime.date.today().isoformat(),
        "device": common.device_name(),
        "torch": torch.__version__,
    }
    meta["command"] = " ".join(["benchmarks/fsdp_step.py", *sys.argv[1:]])
    text = json.dumps({**meta, "records": records}, indent=2)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
