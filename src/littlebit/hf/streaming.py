"""Compressing a safetensors checkpoint one decoder layer at a time.

The model is built on the meta device; each decoder layer in turn is read from the source files (in
float32, as the whole-model path loads it), initialised on the compute device, packed, written to its
own safetensors shard and dropped, so memory holds about one layer plus the embeddings (and, at the
end, the packed model, a small fraction of the source, while the shards become one
``model.safetensors``). The files written are those ``save_compressed`` writes for the same model and
config, byte for byte, digests included.

Work in progress lives in a hidden sibling of the output (``.NAME.partial``) with a manifest of the
source (its path and a fingerprint of its files) and settings, and a ledger of the digest of every
shard written there: after a crash, the same command resumes from the first layer without a shard,
after computing again any shard whose bytes no longer match the ledger. A source that changed at the
same path is refused, so one output never holds the layers of two models.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from tqdm.auto import tqdm

from littlebit.atomic import check_output_dir, make_parents, os_error_message, remove_empty, share_permissions
from littlebit.config import LittleBitConfig, LittleBitError, first_line
from littlebit.core.budget import ModelBudget
from littlebit.core.convert import (
    Target,
    checked_plan,
    convert_module,
    decoder_block_names,
    default_compute_device,
    targets_by_module,
)
from littlebit.hf.checkpoint import prepare_for_save
from littlebit.hf.format import FORMAT_VERSION, cast_unquantized
from littlebit.hf.quantizer import config_as_saved
from littlebit.hf.shards import SINGLE_NAME, SafetensorsCheckpoint, weight_files
from littlebit.hf.verification import config_digest, file_digest, seal_side_files, tensor_digest
from littlebit.runtime.packed import LayerSpec, install_packed_skeleton, pack_model

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

MANIFEST_NAME = "littlebit-partial.json"
LEDGER_NAME = "littlebit-shards.json"
# Pieces of each source weight file read into its fingerprint (reading a 70B checkpoint whole to
# resume would take minutes; a rewritten file also changes its modification time, which counts too)
_SAMPLES, _SAMPLE_BYTES = 16, 1 << 16


class LayerHooks:
    """Work done around each decoder layer as it is converted (block reconstruction fits there).

    The hooks see every layer in order, from the first that ``start`` returns: the layers before it
    are already written, and a hook that keeps state saves it in ``saved`` to resume after them.
    """

    def settings(self) -> dict:
        """What, besides the source and the config, decides the output (kept in the manifest)."""
        return {}

    def start(self, model: nn.Module, checkpoint: SafetensorsCheckpoint, work: Path) -> int:
        """Called once with the meta-device model; returns the first layer to (re)compute."""
        return 0

    def teacher(self, index: int, block: nn.Module) -> None:
        """Layer ``index`` holds the source weights (float32), before conversion."""

    def student(self, index: int, block: nn.Module) -> None:
        """Layer ``index`` is converted (training form), before packing."""

    def saved(self, index: int, work: Path) -> None:
        """Layer ``index`` is written to ``work``."""

    def finish(self, work: Path) -> None:
        """Every layer is written: remove from ``work`` what is not part of the checkpoint."""


def partial_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.partial"


def meta_skeleton(source: Path, trust_remote_code: bool = False) -> nn.Module:
    """The model of ``source`` with every tensor on the meta device (no memory, no weights read)."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    try:
        cfg = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(
                cfg, dtype=torch.float32, trust_remote_code=trust_remote_code
            )
    except Exception as e:  # a bad config.json fails in many ways inside transformers
        raise LittleBitError(f"cannot load model {str(source)!r}: {first_line(e)}") from e
    if model.can_generate():  # as from_pretrained sets it, so that save_pretrained writes the same file
        if (source / "generation_config.json").is_file():
            model.generation_config = GenerationConfig.from_pretrained(source)
        else:
            model.generation_config = GenerationConfig.from_pretrained(
                source, config_file_name="config.json", _from_model_config=True
            )
    return model.eval()


def saved_names(model: nn.Module) -> list[str]:
    """The state-dict names ``save_pretrained`` writes: one of each group of tied tensors."""
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    return list(remove_tied_weights_from_state_dict(model.state_dict(), model))


def missing_from(model: nn.Module, checkpoint: SafetensorsCheckpoint) -> list[str]:
    """Tensors the model needs that the checkpoint does not hold under the model's own names."""
    return [n for n in saved_names(model) if n not in checkpoint]


def check_fits(model: nn.Module, checkpoint: SafetensorsCheckpoint, source: Path) -> None:
    """Refuse, in one line, a checkpoint that lacks a tensor the model needs or holds one of another
    shape (a config.json that disagrees with the weights)."""
    missing = missing_from(model, checkpoint)
    if missing:
        raise LittleBitError(f"{source} lacks {len(missing)} tensor(s) the model needs, e.g. {missing[0]}")
    state = model.state_dict()
    for name in saved_names(model):
        have, want = tuple(checkpoint.entries[name].shape), tuple(state[name].shape)
        if have != want:
            raise LittleBitError(
                f"{source}: tensor {name} has shape {list(have)}, its config.json gives {list(want)}"
            )


def _spec(model: nn.Module, parts: list[Target], config: LittleBitConfig) -> LayerSpec:
    linear = model.get_submodule(parts[0].module_name)
    paths = 2 if config.residual else 1
    bias = linear.bias is not None
    if parts[0].part is None:
        return LayerSpec(linear.in_features, linear.out_features, parts[0].rank, bias, paths)
    rows = [[t.part, t.d_out, t.rank] for t in parts]
    return LayerSpec(linear.in_features, linear.out_features, 0, bias, paths, rows)


def _load_as_saved(checkpoint: SafetensorsCheckpoint, name: str) -> torch.Tensor:
    """A tensor as ``from_pretrained(dtype=torch.float32)`` holds it: floating point in float32."""
    entry = checkpoint.entries[name]
    return checkpoint.read(name, torch.float32 if entry.dtype.is_floating_point else None)


def source_fingerprint(source: Path) -> str:
    """Tells apart the checkpoints that could sit at one path: config.json whole, and for each weight
    file its name, size, modification time, header and evenly spaced samples of its data."""
    h = hashlib.sha256()
    config = source / "config.json"
    h.update(config.read_bytes() if config.is_file() else b"")
    for file in weight_files(source):
        stat = file.stat()
        h.update(f"\0{file.name}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
        with open(file, "rb") as f:
            header = int.from_bytes(f.read(8), "little")
            h.update(f.read(min(header, stat.st_size)))
            for i in range(_SAMPLES):
                f.seek(stat.st_size * i // _SAMPLES)
                h.update(f.read(_SAMPLE_BYTES))
    return h.hexdigest()


def _ledger(work: Path) -> dict[str, str]:
    try:
        ledger = json.loads((work / LEDGER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # none yet, or torn: every shard is then computed again
    ok = isinstance(ledger, dict) and all(isinstance(v, str) for v in ledger.values())
    return ledger if ok else {}


def _write_shard(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write a shard of the work directory, its digest entered in the ledger before it takes its name
    (a shard in place is then always one the ledger can check)."""
    from safetensors.torch import save_file

    work = path.parent
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    record = work / f".{LEDGER_NAME}.tmp-{os.getpid()}"
    try:
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata={"format": "pt"}
        )
        ledger = {**_ledger(work), path.name: file_digest(tmp)}
        record.write_text(json.dumps(ledger, indent=1, sort_keys=True), encoding="utf-8")
        os.replace(record, work / LEDGER_NAME)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        record.unlink(missing_ok=True)


class PartialUnusable(LittleBitError):
    """A partial folder that no rerun can finish."""


def _drop_altered_shards(work: Path, kept_before: int | None) -> None:
    """Remove the shards whose bytes differ from the ledger (damaged, altered, or written without an
    entry), so that they are computed again. With block reconstruction (``kept_before``: the first
    layer it computes again), the layers before that one and the merged file cannot be: later layers
    were fitted after them, so refuse instead."""
    ledger = _ledger(work)
    for shard in sorted(work.glob("model*.safetensors")):
        if ledger.get(shard.name) == file_digest(shard):
            continue
        layer = int(shard.name[6:11]) - 1 if shard.name != SINGLE_NAME else None
        if kept_before is not None and (layer is None or layer < kept_before):
            raise PartialUnusable(
                f"{shard.name} in {work} was altered or damaged since it was written: "
                f"remove {work} to start again"
            )
        log.warning(
            "%s in %s was altered or damaged since it was written: computing it again", shard.name, work
        )
        shard.unlink()


def _open_partial(work: Path, manifest: dict) -> list[Path]:
    """Create the work directory, or check that an existing one was started with these settings;
    returns the parent directories it created (to remove if nothing comes of it)."""
    record = work / MANIFEST_NAME
    if work.is_dir():
        try:
            previous = json.loads(record.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise LittleBitError(f"{work} is not a resumable compression ({first_line(e)}): remove it") from e
        if isinstance(previous, dict) and "source_fingerprint" not in previous:
            raise LittleBitError(
                f"{work} was started by a littlebit that kept no digests of its layers: remove it"
            )
        if previous != manifest:
            raise LittleBitError(
                f"{work} holds a partial compression of another model or with other settings: "
                "rerun that command to finish it, or remove it"
            )
        for stale in work.glob(".*.tmp-*"):  # a shard being written when the process died
            stale.unlink(missing_ok=True)
        return []
    created = make_parents(work.parent)
    work.mkdir()
    record.write_text(json.dumps(manifest, indent=2, sort_keys=True), encoding="utf-8")
    return created


def _resume_point(
    hooks: LayerHooks | None,
    model: nn.Module,
    checkpoint: SafetensorsCheckpoint,
    work: Path,
    shard_files: list[Path],
) -> int:
    """The first layer the hooks compute again (0 without hooks: every missing shard is computed), once
    the shards the ledger does not vouch for are dropped or, where the hooks are past them, refused."""
    first = hooks.start(model, checkpoint, work) if hooks is not None else 0
    _drop_altered_shards(work, first if hooks is not None else None)
    lost = [f.name for f in shard_files[:first] if not f.is_file()]
    if lost and not (work / SINGLE_NAME).is_file():
        # the hooks' states are past these layers: they cannot be computed again from them
        raise PartialUnusable(f"{lost[0]} is missing from {work}: remove {work} to start again")
    return first


def _merge_shards(work: Path, merged: Path) -> None:
    """The layers' shards as one ``model.safetensors``, the file ``save_pretrained`` writes for a model
    of this size (the packed model is a small fraction of the source: it is read whole here)."""
    shards = sorted(work.glob("model-*.safetensors"))
    tensors: dict[str, torch.Tensor] = {}
    for shard in shards:
        checkpoint = SafetensorsCheckpoint.from_files([shard])
        tensors.update((name, checkpoint.read(name)) for name in checkpoint.entries)
    _write_shard(tensors, merged)
    for shard in shards:  # only once the merged file is complete: a crash before resumes from them
        shard.unlink()


def _digests(merged: Path, model: nn.Module) -> dict[str, str]:
    """Digests of every state-dict name, read back from the written file (tied names share one)."""
    checkpoint = SafetensorsCheckpoint.from_files([merged])
    written = {name: tensor_digest(checkpoint.read(name)) for name in checkpoint.entries}
    owner: dict[int, str] = {}
    for name in written:
        owner[id(model.get_parameter_or_buffer(name))] = name
    digests = {}
    for name in model.state_dict():
        digests[name] = written.get(name) or written[owner[id(model.get_parameter_or_buffer(name))]]
    return dict(sorted(digests.items()))


def _write_config(work: Path, model: nn.Module, config: LittleBitConfig, digests: dict, dtype, scale_dtype):
    cast_unquantized(model, dtype)
    prepare_for_save(model, config, scale_dtype)
    q = model.config.quantization_config
    q.tensor_digests = digests
    q.config_digest = config_digest(config_as_saved(model))
    # what save_pretrained sets before writing the config
    model.config.dtype = str(model.dtype).split(".")[1]
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(work)
    if model.can_generate():
        model.generation_config.save_pretrained(work)


def compress_streamed(
    source: str | Path,
    out: str | Path,
    config: LittleBitConfig,
    tokenizer: PreTrainedTokenizerBase | None = None,
    dtype: torch.dtype = torch.bfloat16,
    scale_dtype: torch.dtype = torch.float16,
    compute_device: torch.device | str | None = None,
    trust_remote_code: bool = False,
    progress: bool = True,
    hooks: LayerHooks | None = None,
) -> ModelBudget:
    """Compress the safetensors checkpoint in directory ``source`` into ``out``, a layer at a time.

    Same arguments and result as ``convert`` followed by ``save_compressed``. Interrupted, it leaves its
    finished layers in ``.OUT.partial`` next to ``out``, and the same call resumes from there.
    ``hooks`` act on each layer between reading and writing it (``LayerHooks``).
    """
    source, out = Path(source), Path(os.path.abspath(out))  # "." has no name to put the partial beside
    check_output_dir(out)
    checkpoint = SafetensorsCheckpoint(source)
    model = meta_skeleton(source, trust_remote_code)
    check_fits(model, checkpoint, source)
    targets, report = checked_plan(model, config)
    compute_device = default_compute_device(compute_device)

    blocks = decoder_block_names(model)
    by_module = targets_by_module(targets)
    index_of = {name: i for i, name in enumerate(by_module)}
    names = saved_names(model)
    n_files = len(blocks) + 1
    manifest = {
        "source": str(source.resolve()),
        "source_fingerprint": source_fingerprint(source),
        "littlebit": config.to_dict(),
        "dtype": str(dtype),
        "scale_dtype": str(scale_dtype),
        "format_version": FORMAT_VERSION,
        "hooks": hooks.settings() if hooks is not None else {},
    }
    manifest = json.loads(json.dumps(manifest))  # as read back when resuming (tuples become lists)
    work = partial_dir(out)
    created = _open_partial(work, manifest)
    merged = work / SINGLE_NAME
    try:
        shard_files = [work / f"model-{k + 1:05d}-of-{n_files:05d}.safetensors" for k in range(n_files)]
        first = _resume_point(hooks, model, checkpoint, work, shard_files)
        for k, block_name in enumerate(tqdm(blocks, desc="LittleBit layers", disable=not progress)):
            file = shard_files[k]
            prefix = block_name + "."
            modules = [m for m in by_module if m.startswith(prefix)]
            if merged.is_file() or (file.is_file() and (hooks is None or k < first)):
                specs = {m: _spec(model, by_module[m], config) for m in modules}
                install_packed_skeleton(model, specs, scale_dtype)
            else:
                _compress_block(
                    hooks,
                    k,
                    model,
                    block_name,
                    checkpoint,
                    modules,
                    by_module,
                    index_of,
                    config,
                    file,
                    dtype,
                    scale_dtype,
                    compute_device,
                )
        if not merged.is_file():
            rest_file = shard_files[-1]
            rest = [n for n in names if not n.startswith(tuple(b + "." for b in blocks))]
            if not rest_file.is_file():
                _write_rest(model, checkpoint, rest, rest_file, dtype)
            _merge_shards(work, merged)
        _write_config(work, model, config, _digests(merged, model), dtype, scale_dtype)
        if tokenizer is not None:
            tokenizer.save_pretrained(work)
        if hooks is not None:
            hooks.finish(work)
        # The manifest stays until the last step that can fail, so that a rerun still resumes.
        seal_side_files(work, skip=(MANIFEST_NAME, LEDGER_NAME))
        check_output_dir(out)
        share_permissions(work)
        # the manifest first: killed between the two, the folder is not taken for one to resume
        (work / MANIFEST_NAME).unlink()
        (work / LEDGER_NAME).unlink(missing_ok=True)
        if out.is_dir():
            out.rmdir()  # empty: checked above
        os.replace(work, out)
    except BaseException as e:
        finished = len(list(work.glob("model*.safetensors")))
        if isinstance(e, PartialUnusable):
            raise  # its message says what to do with the folder
        if finished == 0:
            shutil.rmtree(work, ignore_errors=True)  # nothing to resume from: leave nothing behind
            remove_empty(created)
        elif not (work / MANIFEST_NAME).is_file():
            log.warning("the compressed model is complete in %s but could not be moved to %s", work, out)
        else:
            log.warning("compression stopped: %d shard(s) kept in %s; rerun to resume", finished, work)
        if isinstance(e, OSError):
            raise LittleBitError(os_error_message(e, str(out))) from e
        raise
    return report


def _compress_block(
    hooks: LayerHooks | None,
    k: int,
    model: nn.Module,
    block_name: str,
    checkpoint: SafetensorsCheckpoint,
    modules: list[str],
    by_module: dict[str, list[Target]],
    index_of: dict[str, int],
    config: LittleBitConfig,
    file: Path,
    dtype: torch.dtype,
    scale_dtype: torch.dtype,
    compute_device,
) -> None:
    """Read, initialise, pack and write one decoder layer, then put it back on the meta device."""
    block = model.get_submodule(block_name)
    block.to_empty(device="cpu")
    prefix = block_name + "."
    state = {n.removeprefix(prefix): _load_as_saved(checkpoint, n) for n in block.state_dict(prefix=prefix)}
    block.load_state_dict(state, assign=True, strict=True)
    del state  # the block holds the only reference: each linear's weight is freed once converted
    if hooks is not None:
        hooks.teacher(k, block)
    for name in modules:
        convert_module(model, name, by_module[name], config, index_of[name], compute_device)
    if hooks is not None:
        hooks.student(k, block)
    pack_model(block, scale_dtype)
    cast_unquantized(block, dtype)
    _write_shard(block.state_dict(prefix=prefix), file)
    block.to("meta")
    if hooks is not None:
        hooks.saved(k, file.parent)


def _write_rest(
    model: nn.Module, checkpoint: SafetensorsCheckpoint, names: list[str], file: Path, dtype
) -> None:
    """Embeddings, head and final norm, cast as ``cast_unquantized`` casts them (parameters only)."""
    params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    tensors = {}
    for n in names:
        t = _load_as_saved(checkpoint, n)
        tensors[n] = t.to(dtype) if n in params and t.is_floating_point() else t
        del t
    _write_shard(tensors, file)
