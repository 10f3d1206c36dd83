"""Seeded single mutations of a saved checkpoint: each is refused with one line, or changes nothing.

Every mutation touches one thing: a field of config.json (changed, deleted, added, retyped), the
safetensors header (dtype, shape, offsets, names, metadata), the data (a flipped bit, a truncation,
appended bytes) or a file beside them (the generation defaults edited, damaged or deleted, a tokenizer
file added). Loading the mutated directory must either raise a one-line ``LittleBitError`` or give
exactly the logits of the original, through littlebit's loader and through transformers'
``from_pretrained`` alike; a mutated side file, which leaves the logits as they were, must be refused by
littlebit's loader.
"""

from __future__ import annotations

import copy
import json
import os
import random
import shutil
import struct
import warnings
from pathlib import Path

import pytest
import torch
import transformers as tf
from transformers import AutoModelForCausalLM

from littlebit import LittleBitConfig, LittleBitError, load_compressed, save_compressed
from littlebit.cli.main import main as cli_main
from littlebit.core.convert import convert

# 300 in the suite (about 10 s); LITTLEBIT_MUTATIONS=1000 for the acceptance run in BENCHMARKS.md.
N_MUTATIONS = int(os.environ.get("LITTLEBIT_MUTATIONS", "300"))


def _tied_tiny_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    config = tf.LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    return tf.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    model = _tied_tiny_llama()
    convert(model, LittleBitConfig(bpw=4.0), progress=False)
    out = tmp_path_factory.mktemp("mutations") / "original"
    save_compressed(model, out, dtype=torch.float32)
    x = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = load_compressed(out)(x).logits
    return out, x, ref


# ----- mutations --------------------------------------------------------------------------------


def _paths(node, prefix=()):
    """Every key path in a JSON tree (dict keys and list indices)."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield (*prefix, k)
            yield from _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield (*prefix, i)
            yield from _paths(v, (*prefix, i))


def _other_value(rng: random.Random, value):
    if isinstance(value, bool):
        return rng.choice([not value, int(value), str(value).lower()])
    if isinstance(value, int):
        return rng.choice([value + 1, value - 1, value * 2, 0, -value, str(value), float(value) + 0.5])
    if isinstance(value, float):
        return rng.choice([value * 1.5, value + 1e-6, -value, 0.0, str(value), None])
    if isinstance(value, str):
        return rng.choice([value + "x", "", value.upper(), "float32", "Tensor", 1, None])
    if isinstance(value, list):
        return rng.choice([value[:-1], [*value, copy.deepcopy(value[-1]) if value else 1], [], None])
    if isinstance(value, dict):
        return rng.choice([{}, None, "x", {**value, "extra": 1}])
    return rng.choice([0, "x", True, [], {}])


def _mutate_config(rng: random.Random, cfg: dict) -> str:
    path = rng.choice(list(_paths(cfg)))
    parent = cfg
    for key in path[:-1]:
        parent = parent[key]
    key = path[-1]
    action = rng.choice(["change", "change", "delete", "add"])
    if action == "delete":
        del parent[key]
    elif action == "add" and isinstance(parent, dict):
        parent[f"added_{rng.randrange(100)}"] = rng.choice([0, 1.5, "x", True, None])
    elif action == "add":
        parent.insert(key, copy.deepcopy(parent[key]))
    else:
        parent[key] = _other_value(rng, parent[key])
    return f"config {action} {'/'.join(map(str, path))}"


def _read_safetensors(path: Path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _write_safetensors(path: Path, header: dict, body: bytes) -> None:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + body)


def _mutate_header(rng: random.Random, path: Path) -> str:
    header, body = _read_safetensors(path)
    names = sorted(k for k in header if k != "__metadata__")
    name = rng.choice(names)
    entry = header[name]
    action = rng.choice(["dtype", "shape", "offsets", "delete", "rename", "metadata", "duplicate"])
    if action == "dtype":
        entry["dtype"] = rng.choice(
            [d for d in ("F32", "F16", "BF16", "I32", "I16", "U8") if d != entry["dtype"]]
        )
    elif action == "shape" and entry["shape"]:
        i = rng.randrange(len(entry["shape"]))
        entry["shape"][i] = rng.choice([entry["shape"][i] + 1, max(1, entry["shape"][i] // 2)])
    elif action == "shape":
        entry["shape"] = [1]
    elif action == "offsets":
        start, end = entry["data_offsets"]
        entry["data_offsets"] = rng.choice([[start + 4, end + 4], [start, end - 4], [start - 4, end - 4]])
    elif action == "delete":
        del header[name]
    elif action == "rename":
        header[name + "_"] = header.pop(name)
    elif action == "metadata":
        header["__metadata__"] = {"format": rng.choice(["pt", "np", "x"])}
    else:
        header[name.rsplit(".", 1)[0] + ".extra"] = copy.deepcopy(entry)
    _write_safetensors(path, header, body)
    return f"header {action} {name}"


def _mutate_data(rng: random.Random, path: Path) -> str:
    data = bytearray(path.read_bytes())
    n = struct.unpack("<Q", bytes(data[:8]))[0]
    action = rng.choice(["flip", "flip", "truncate", "append"])
    if action == "flip":
        pos = rng.randrange(8 + n, len(data))
        data[pos] ^= 1 << rng.randrange(8)
    elif action == "truncate":
        data = data[: rng.randrange(len(data))]
    else:
        data += bytes(rng.randrange(256) for _ in range(rng.choice([1, 8, 64])))
    path.write_bytes(bytes(data))
    return f"data {action}"


def _mutate_side_file(rng: random.Random, directory: Path) -> str:
    """A file beside the tensors: the generation defaults edited, damaged or deleted, or a tokenizer
    file added. None changes the logits, so each must be refused outright."""
    gen = directory / "generation_config.json"
    action = rng.choice(["edit", "flip", "delete", "add"])
    if action == "edit":
        data = json.loads(gen.read_text())
        key = rng.choice([*data, "temperature", "eos_token_id"])
        data[key] = _other_value(rng, data.get(key, 1))
        gen.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    elif action == "flip":
        raw = bytearray(gen.read_bytes())
        raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(7)
        gen.write_bytes(bytes(raw))
    elif action == "delete":
        gen.unlink()
    else:
        name = rng.choice(["tokenizer.json", "special_tokens_map.json", "chat_template.jinja"])
        (directory / name).write_text("{}")
    return f"side {action}"


def mutate(rng: random.Random, directory: Path) -> str:
    kind = rng.choice(["config", "config", "header", "data", "side"])
    if kind == "side":
        return _mutate_side_file(rng, directory)
    if kind == "config":
        cfg_path = directory / "config.json"
        cfg = json.loads(cfg_path.read_text())
        what = _mutate_config(rng, cfg)
        cfg_path.write_text(json.dumps(cfg, indent=2))
        return what
    weights = directory / "model.safetensors"
    return _mutate_header(rng, weights) if kind == "header" else _mutate_data(rng, weights)


# ----- the test ---------------------------------------------------------------------------------


def _names_littlebit(directory: Path) -> bool:
    try:
        q = json.loads((directory / "config.json").read_text()).get("quantization_config")
    except (json.JSONDecodeError, AttributeError):
        return False
    return isinstance(q, dict) and q.get("quant_method") == "littlebit"


def _outcome(load, directory: Path, x: torch.Tensor, ref: torch.Tensor) -> str:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = load(directory)
            with torch.no_grad():
                out = model(x).logits
    except LittleBitError as e:
        assert "\n" not in str(e), str(e)
        return "refused"
    except Exception as e:  # transformers' own refusals (a config it cannot build, a file it cannot parse)
        return f"refused by {type(e).__name__}"
    return "identical" if out.shape == ref.shape and torch.equal(out, ref) else "DIFFERENT"


def test_every_single_mutation_is_refused_or_harmless(original, tmp_path, capsys):
    out, x, ref = original
    rng = random.Random(20261204)
    silent, counts = [], {"refused": 0, "identical": 0, "refused by transformers": 0}
    for i in range(N_MUTATIONS):
        case = tmp_path / f"m{i}"
        shutil.copytree(out, case)
        what = mutate(rng, case)
        result = _outcome(load_compressed, case, x, ref)
        if _names_littlebit(case):
            # transformers ignores a quant_method it does not know (warning only), so its own loader is
            # held to the rule only while config.json still names littlebit.
            raw = _outcome(AutoModelForCausalLM.from_pretrained, case, x, ref)
            if raw == "DIFFERENT":
                silent.append(f"{what} (from_pretrained)")
        if result == "DIFFERENT":
            silent.append(what)
        if what.startswith("side") and result != "refused":
            silent.append(what)  # its logits cannot show it: the only right outcome is a refusal
        counts[result if result in counts else "refused by transformers"] += 1
        if i % 10 == 0:  # the CLI on the damaged directory: an exit code and one line, never a traceback
            capsys.readouterr()
            code = cli_main(["info", str(case)])
            err = [
                ln
                for ln in capsys.readouterr().err.splitlines()
                if ln.strip() and "Loading weights" not in ln
            ]
            assert code in (0, 2) and len(err) == (code != 0), f"{what}: {err}"
        shutil.rmtree(case)
    print(f"{N_MUTATIONS} mutations: {counts}")
    assert not silent, silent
    assert counts["refused"] > N_MUTATIONS // 2, counts
