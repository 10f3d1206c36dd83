"""``littlebit compress``: convert and initialise a model's linear layers, save it packed."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from littlebit.cli.common import (
    DTYPES,
    add_compression_arguments,
    compression_config,
    device_name,
    int_at_least,
    torch_dtype,
)
from littlebit.config import LittleBitError

IN_MEMORY_HELP = (
    "load the whole model in float32 before converting it. By default a safetensors checkpoint "
    "(local directory or hub id) is streamed a decoder layer at a time instead: the same tensors, "
    "in memory about one layer plus the embeddings, and an interrupted run resumes when rerun"
)


RECONSTRUCT_HELP = (
    "fit each compressed decoder layer to the original's outputs on calibration text before writing "
    "it (post-training reconstruction; the block stage of littlebit train, for models of any size)"
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_compression_arguments(p, init_default="dual-svid", paths_default="two")
    p.add_argument(
        "--dtype", default="bfloat16", choices=DTYPES, help="precision of the uncompressed weights saved"
    )
    p.add_argument("--in-memory", action="store_true", help=IN_MEMORY_HELP)
    r = p.add_argument_group("block reconstruction (streamed: one decoder layer on the device at a time)")
    r.add_argument("--reconstruct", action="store_true", help=RECONSTRUCT_HELP)
    r.add_argument(
        "--calibration", help="text for it: a split (wikitext2:valid, the default), a text file or hf:NAME..."
    )
    r.add_argument("--block-sequences", type=int_at_least(1), default=256, help="calibration sequences")
    r.add_argument("--seqlen", type=int_at_least(2), default=512, help="tokens per calibration sequence")
    r.add_argument("--block-epochs", type=int_at_least(1), default=4, help="passes over them per layer")
    r.add_argument("--block-batch-size", type=int_at_least(1), default=2, help="sequences per step")


def _streamable(args: argparse.Namespace) -> Path | None:
    """The safetensors directory to stream from, or None to load the model whole."""
    if args.in_memory:
        return None
    from littlebit.cli.common import is_littlebit_dir
    from littlebit.hf.shards import SafetensorsCheckpoint, locate_safetensors
    from littlebit.hf.streaming import meta_skeleton, missing_from

    source = locate_safetensors(args.model)
    if source is None or is_littlebit_dir(str(source)):
        return None  # the whole-model loader refuses a LittleBit checkpoint with its own message
    # names the model does not find as saved (a checkpoint with renamed tensors) load whole instead
    model = meta_skeleton(source, args.trust_remote_code)
    return None if missing_from(model, SafetensorsCheckpoint(source)) else source


def _reconstruction(args: argparse.Namespace, tokenizer, device: str):
    from littlebit.training.config import BlockConfig
    from littlebit.training.stream import load_tokens, pack_sequences
    from littlebit.training.streamed_blocks import StreamedBlockReconstruction

    needed = args.block_sequences * args.seqlen  # as far as a hf: source is read
    sequences = pack_sequences(load_tokens(args.calibration, tokenizer, needed), args.seqlen)
    bs = args.block_batch_size
    n = min(args.block_sequences, sequences.shape[0]) // bs * bs  # whole batches: one attention shape
    if n == 0:
        raise LittleBitError(f"the calibration text fills fewer than {bs} sequences of {args.seqlen} tokens")
    block = BlockConfig(sequences=n, epochs=args.block_epochs, batch_size=bs)
    return StreamedBlockReconstruction(sequences[:n], block, device=device)


def run(args: argparse.Namespace) -> int:
    import torch

    from littlebit.atomic import check_output_dir
    from littlebit.hf.models import load_tokenizer

    config = compression_config(args)
    check_output_dir(Path(args.out))  # fail before the slow part if the output is unusable
    device = device_name(args.device)
    t0 = time.perf_counter()
    if args.reconstruct and args.in_memory:
        raise LittleBitError("--reconstruct streams the model a layer at a time: drop --in-memory")
    if args.calibration is not None:
        if not args.reconstruct:
            raise LittleBitError("--calibration is the text of --reconstruct: add --reconstruct or drop it")
        from littlebit.evaluation.data import check_training_source

        check_training_source(args.calibration)
    source = _streamable(args)
    if args.reconstruct and source is None:
        raise LittleBitError(
            "--reconstruct streams the model: it needs a safetensors checkpoint (littlebit train runs "
            "the block stage on a model loaded whole)"
        )
    if source is not None:
        from littlebit.hf.streaming import compress_streamed

        tokenizer = load_tokenizer(str(source), args.trust_remote_code)
        hooks = _reconstruction(args, tokenizer, device) if args.reconstruct else None
        t1 = time.perf_counter()
        report = compress_streamed(
            source,
            args.out,
            config,
            tokenizer,
            torch_dtype(args.dtype),
            torch.float16,
            device,
            args.trust_remote_code,
            hooks=hooks,
        )
        t2 = time.perf_counter()
        how = f"streamed a layer at a time in {t2 - t1:.1f}s"
        if hooks is not None and hooks.losses:
            how += f", block reconstruction error (last layer) {hooks.losses[-1]:.4f}"
    else:
        from littlebit.core.convert import convert
        from littlebit.hf.checkpoint import save_compressed
        from littlebit.hf.models import load_model

        model = load_model(args.model, torch.float32, device, args.trust_remote_code)
        tokenizer = load_tokenizer(args.model, args.trust_remote_code)
        t1 = time.perf_counter()
        report = convert(model, config, compute_device=device)
        t2 = time.perf_counter()
        save_compressed(model, args.out, tokenizer, config, dtype=torch_dtype(args.dtype))
        how = f"load {t1 - t0:.1f}s, compress {t2 - t1:.1f}s"
    print(
        f"compressed {args.model or 'SmolLM2-135M-Instruct'}: {len(report.layers)} layers, "
        f"BPW {report.bpw_linear:.4f} (linear), {report.bpw_total:.4f} (all weights); {how} -> {args.out}"
    )
    return 0
