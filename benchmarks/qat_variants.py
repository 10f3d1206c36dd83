"""Named training recipes for benchmarks/qat.py: the default and its ablations.

Each entry overrides ``TrainConfig`` fields (nested dicts merge into ``lrs``, ``blocks``, ``loss`` and
``generation``); three keys are not ``TrainConfig`` fields: ``littlebit`` (``LittleBitConfig``
fields), ``data`` (a data spec, ``littlebit.training.data``) and ``block_share`` (the block stage's
share of the budget). Variants in ``RECIPE`` have their stages sized by
``littlebit.training.recipe.plan_budget`` from the token budget, as ``littlebit train --tokens`` does;
the older ones keep the block stage they pin and spend the rest of the budget in global steps, so
their recorded numbers reproduce.
"""

from __future__ import annotations

# Earlier ablations, each pinned to the recipe it was measured against (data: WikiText-2 validation).
VARIANTS: dict[str, dict] = {
    "default": {},
    "paper": {  # the paper's recipe: plain init, summed-MSE loss, no block stage, frozen norms
        "act_power": 0.0,
        "latent_rms": None,
        "blocks": {"sequences": 0},
        "loss": {"form": "paper"},
        "train_norms": False,
        "lrs": {"latent": 4e-5, "scale": 4e-5, "norm": 4e-5, "relative": False},
    },
    "no-blocks": {"blocks": {"sequences": 0}},
    "small-blocks": {"blocks": {"sequences": 32, "epochs": 4}},
    "big-blocks": {"blocks": {"sequences": 128, "epochs": 4}},  # the block stage of OLD_DEFAULT
    "huge-blocks": {"blocks": {"sequences": 256, "epochs": 4}},
    "no-act": {"act_power": 0.0},
    # The latent-lr ablations ran with the earlier 32-sequence block stage; pinned to reproduce them.
    "latent-3x": {"lrs": {"latent": 3e-4}, "blocks": {"sequences": 32}},
    "latent-0.3x": {"lrs": {"latent": 3e-5}, "blocks": {"sequences": 32}},
    "hidden-0": {"loss": {"hidden_weight": 0.0}},
    # Sequences as long as the evaluation's (2048), same tokens per step and per block stage.
    "long-seq": {
        "seqlen": 2048,
        "batch_size": 2,
        "calib_sequences": 4,
        "blocks": {"sequences": 32, "batch_size": 1},
    },
    "scale-2.5x": {"lrs": {"scale": 5e-3}},
    "blocks-lr1": {"blocks": {"lr_multiplier": 1.0}},
    # Same tokens in more, smaller steps: global batch 4 or 2 sequences, block batch 2.
    "global-b4": {"batch_size": 4},
    "global-b2": {"batch_size": 2},
    "blocks-b2": {"blocks": {"batch_size": 2}},
    "latent-rms-keep": {"latent_rms": None},
    # Throughput only: 30 steps of global distillation, no block stage, no evaluation curve.
    "speed": {"blocks": {"sequences": 0}, "act_power": 0.0},
    "speed-eager": {"blocks": {"sequences": 0}, "act_power": 0.0, "compile": False, "cuda_graphs": False},
    "speed-compiled": {"blocks": {"sequences": 0}, "act_power": 0.0, "compile": True, "cuda_graphs": False},
}
# Two changes above at once (their keys do not overlap).
VARIANTS["b4-blocks-b2"] = {**VARIANTS["global-b4"], **VARIANTS["blocks-b2"]}
VARIANTS["huge-b4"] = {**VARIANTS["huge-blocks"], **VARIANTS["global-b4"]}

# Every variant above is pinned to an earlier recipe, OLD_DEFAULT (global batch 8; block stage of 128
# sequences in batches of 4; latent lr 1e-4; no clipping), so its recorded number reproduces;
# throughput ("speed*") is quoted at batch 8 x 512.
OLD_DEFAULT = {
    "batch_size": 8,
    "blocks": {"sequences": 128, "batch_size": 4},
    "lrs": {"latent": 1e-4},
    "max_grad_norm": None,
}


def _on(base: dict, over: dict) -> dict:
    nested = {k: {**base[k], **v} for k, v in over.items() if isinstance(v, dict) and k in base}
    return {**base, **over, **nested}


VARIANTS = {name: over if name == "default" else _on(OLD_DEFAULT, over) for name, over in VARIANTS.items()}
VARIANTS["old-default"] = dict(OLD_DEFAULT)
# What helped at 1.0 BPW, together: global batch 2, block stage of 256 sequences in batches of 2 (as
# in TrainConfig()); with one path of about twice the rank instead of the residual pair.
VARIANTS["small-steps"] = {
    "batch_size": 2,
    "blocks": {"sequences": 256, "batch_size": 2},
    "lrs": {"latent": 1e-4},  # TrainConfig() uses 6e-5 ("latent-0.6x")
    "max_grad_norm": None,  # TrainConfig() clips at 1 ("latent-0.6x-clip1"); the variants below do not
}
VARIANTS["small-steps-single-path"] = {**VARIANTS["small-steps"], "littlebit": {"residual": False}}
# One path with global batch 1 (2160 steps for the same tokens): the next step along "smaller steps".
VARIANTS["b1-single-path"] = {**VARIANTS["small-steps-single-path"], "batch_size": 1}
# 1.0 BPW: learning rates re-tuned for the small steps (they were tuned at global batch 8 and, for the
# block stage, at 32 steps per layer instead of 512), and a block stage that sees twice the distinct
# sequences for the same tokens.
_SMALL_BLOCKS = VARIANTS["small-steps"]["blocks"]
VARIANTS["blocks-lr2"] = {**VARIANTS["small-steps"], "blocks": {**_SMALL_BLOCKS, "lr_multiplier": 2.0}}
VARIANTS["latent-0.6x"] = {**VARIANTS["small-steps"], "lrs": {"latent": 6e-5}}
VARIANTS["lrs-0.6x"] = {**VARIANTS["small-steps"], "lrs": {"latent": 6e-5, "scale": 1.2e-3, "norm": 1.2e-3}}
VARIANTS["latent-0.4x"] = {**VARIANTS["small-steps"], "lrs": {"latent": 4e-5}}
VARIANTS["latent-0.25x"] = {**VARIANTS["small-steps"], "lrs": {"latent": 2.5e-5}}
VARIANTS["latent-0.6x-seed1"] = {**VARIANTS["latent-0.6x"], "seed": 1}
VARIANTS["latent-0.4x-seed1"] = {**VARIANTS["latent-0.4x"], "seed": 1}
VARIANTS["latent-0.6x-hidden0.3"] = {**VARIANTS["latent-0.6x"], "loss": {"hidden_weight": 0.3}}
VARIANTS["latent-0.6x-hidden0.1"] = {**VARIANTS["latent-0.6x"], "loss": {"hidden_weight": 0.1}}
# More of the budget in the block stage, at latent rate 6e-5 (fewer global steps for the same tokens).
_BLOCKS_384 = {**_SMALL_BLOCKS, "sequences": 384}
VARIANTS["latent-0.6x-blocks384"] = {**VARIANTS["latent-0.6x"], "blocks": _BLOCKS_384}
VARIANTS["latent-0.6x-blocks256x6"] = {**VARIANTS["latent-0.6x"], "blocks": {**_SMALL_BLOCKS, "epochs": 6}}
VARIANTS["latent-0.6x-hidden0.3-blocks384"] = {**VARIANTS["latent-0.6x-hidden0.3"], "blocks": _BLOCKS_384}
# A wider SmoothSign window (alpha x latent RMS = 1 instead of 2), so more latents
# far from zero still get a gradient above Adam's epsilon.
VARIANTS["latent-0.6x-alpha50"] = {**VARIANTS["latent-0.6x"], "littlebit": {"smooth_alpha": 50.0}}
# On latent-0.6x: faster block steps (lr x8 instead of x5; x2 was worse),
# activation statistics from 64 calibration sequences instead of 16, and gradient clipping at norm 1.
_LATENT = VARIANTS["latent-0.6x"]
VARIANTS["latent-0.6x-blocks-lr8"] = {**_LATENT, "blocks": {**_SMALL_BLOCKS, "lr_multiplier": 8.0}}
VARIANTS["latent-0.6x-calib64"] = {**_LATENT, "calib_sequences": 64}
VARIANTS["latent-0.6x-clip1"] = {**_LATENT, "max_grad_norm": 1.0}
VARIANTS["latent-0.6x-clip1-seed1"] = {**VARIANTS["latent-0.6x-clip1"], "seed": 1}
VARIANTS["blocks-512x2"] = {
    **VARIANTS["small-steps"],
    "blocks": {**_SMALL_BLOCKS, "sequences": 512, "epochs": 2},
}


# ----- the recipe: budget split by plan_budget, data mixture, held-out evaluation ------------------
# "default" is what ``littlebit train`` does with no arguments but the budget: the default data
# (the local WikiText-2 validation split, or generated text alone without a local corpus).
_RECIPE = {
    "default": {},
    # Data: Wikipedia alone (the default data where it is local), generated alone, and mixtures.
    "data-wiki": {"data": "wikitext2:valid"},
    "data-generated": {"data": "generated"},
    "data-gen0.7": {"data": "generated:0.7,wikitext2:valid:0.3"},
    "data-gen0.5": {"data": "generated:0.5,wikitext2:valid:0.5"},
    "data-gen0.3": {"data": "generated:0.3,wikitext2:valid:0.7"},
    # How much generated text: the same budget over half as many distinct sequences (each seen twice).
    "data-half-unique": {"data_tokens": "half"},
    # Sampling of the generated text (1.0 BPW, H100: temperature 0.8 lost, no chat starts tied;
    # qat_generation_h100.json).
    "gen-temp0.8": {"generation": {"temperature": 0.8}},
    "gen-top-p1": {"generation": {"top_p": 1.0}},
    "gen-no-chat": {"generation": {"starts": ["bos", "random"]}},
    # The teacher's dtype while it samples: on a GPU the default is bf16 (2.78x the tokens/s); fp32 is
    # the text the recipe was chosen on.
    "gen-fp32": {"generation": {"dtype": "float32"}},
    # Loss: no hidden-state term; the hidden-state term at a third.
    "hidden-0-recipe": {"loss": {"hidden_weight": 0.0}},
    "hidden-0.3-recipe": {"loss": {"hidden_weight": 0.3}},
    # Block stage: none, or half the budget; or its tokens over more distinct sequences, read once or
    # twice instead of four times (the global phase's text does not repeat).
    "blocks-0": {"block_share": 0.0},
    "blocks-0.5": {"block_share": 0.5},
    "blocks-1-epoch": {"blocks": {"epochs": 1}},
    "blocks-2-epochs": {"blocks": {"epochs": 2}},
    # Initialisation: no activation-aware scaling.
    "no-act-recipe": {"act_power": 0.0},
    # A final scale-only phase (signs frozen for the last global steps) lost at 40k CPU and 1.6M GPU
    # tokens and was removed: `git show ad8ffb6:benchmarks/qat_variants.py` has `scale-tail-0.1`.
    # Sequence length: 1024 keeps the tokens per step (and per block-stage step); 2048 takes one
    # sequence a step, twice the tokens, so half the steps.
    "seq1024": {"seqlen": 1024, "batch_size": 1, "blocks": {"batch_size": 1}},
    "seq2048": {"seqlen": 2048, "batch_size": 1, "blocks": {"batch_size": 1}},
    # The path layout, whichever the budget's default (``littlebit.training.recipe.default_layout``):
    # one path of about twice the rank, or the residual pair.
    "single-path": {"littlebit": {"residual": False}},
    "residual-pair": {"littlebit": {"residual": True}},
    # Bits per kind of layer: uniform, or the attention projections at 1.5x the target and the other
    # layers lower at the same mean (the default from 409,600 tokens,
    # ``littlebit.training.recipe.default_layout``). Behind it: the trained model's loss against the FP
    # model's grows with the position in the window (benchmarks/dev/position_nll.py).
    "attention-bits-1x": {"littlebit": {"attention_bpw_factor": 1.0}},
    "attention-bits-1.5x": {"littlebit": {"attention_bpw_factor": 1.5}},
    "attention-bits-2x": {"littlebit": {"attention_bpw_factor": 2.0}},
    # Between the measured factors (1.5 won against 1 and 2 at 1.0 and 0.55 BPW).
    "attention-bits-1.25x": {"littlebit": {"attention_bpw_factor": 1.25}},
    "attention-bits-1.75x": {"littlebit": {"attention_bpw_factor": 1.75}},
    "seed1": {"seed": 1},
    # Learning rates for text that does not repeat: the latent rate (6e-5) was chosen on the WikiText-2
    # split read six times over.
    "latent-lr-1.5x": {"lrs": {"latent": 9e-5}},
    "lrs-1.5x": {"lrs": {"latent": 9e-5, "scale": 3e-3, "norm": 3e-3}},
}
for _name in (
    "data-generated",
    "data-gen0.7",
    "data-gen0.5",
    "data-gen0.3",
    "hidden-0-recipe",
    "blocks-1-epoch",
):
    _RECIPE[f"{_name}-seed1"] = {**_RECIPE[_name], "seed": 1}  # another data order (and generated text)
RECIPE = set(_RECIPE)
VARIANTS.update(_RECIPE)
