"""Latent KV cache: keep the rank-r latents of the k and v projections instead of K and V.

A LittleBit projection is ``y = sum_p h_p * (S_U,p (l_p * (S_V,p^T (g_p * x))))``. Everything before
``S_U`` maps a token to ``z`` = the P latents of rank r stacked (``P*r`` numbers); ``S_U`` and ``h``
then expand ``z`` to the d_kv outputs. Caching ``z`` instead of ``y`` shrinks each of K and V by
``d_kv / (P*r)``; K and V are rebuilt from the cached latents whenever attention needs them.

Design. The model's own attention forward is left untouched; two small pieces plug into it:

* a forward pre-hook on every supported attention module whose k/v projection is a LittleBit layer.
  When (and only when) the cache it is called with is a ``LatentKVCache`` (found by type, whatever
  the argument's name in the installed transformers), the hook hands the cache that layer's input
  ``hidden_states`` and ``position_ids``. With any other cache the hook does nothing, so one model
  can be used with both caches.
* the cache's ``update``, which attention calls with the new tokens' K (already rotated) and V. It
  turns the captured input into latents (``z = x A``, with ``A`` = the folded S_V, g and l), appends
  them, and returns the full K and V: the past rebuilt as ``z B^T`` (``B`` = the folded S_U and h)
  with rotary embeddings applied at each cached token's own position, the new tokens as given.

Rotary position embeddings are applied after the projection, so a cached latent cannot carry its
rotation. The cache keeps each token's position (one int32 per token and batch row, shared by all
layers, so left-padded batches stay right) and recomputes cos/sin with the model's own rotary module,
once per forward. This is exact only where nothing sits between the projection and the rotation and
where the rotation depends on the position alone, hence the allow-list: Llama, Mistral and
Qwen2-family attention with RoPE and GQA. Attention that normalises k before rotary (Qwen3, Gemma3),
fused qkv projections, other position schemes and length-dependent RoPE (dynamic NTK, LongRoPE) are
refused with a ``LittleBitError`` instead of producing wrong text. Sliding-window layers (Mistral,
Qwen2) keep every token; the attention mask, not the cache, applies the window, so results still match.

The dense factors ``A`` (P*r x d_in) and ``B`` (d_kv x P*r) turn both steps into plain GEMMs (tensor
cores at long contexts); they are built once per layer and held by the cache (``workspace_bytes``),
or rebuilt from the packed bits at every call with ``keep_factors=False`` (on the GPU in one Triton
pass per factor, the GEMM path's expansion).

The price is compute: every decoding step rebuilds K and V for the whole context (BENCHMARKS.md,
"Latent KV cache"). In fp32 the result matches a ``DynamicCache`` to rounding; in 16-bit the rebuilt K
and V are as accurate as the packed op's own (the folded factors round differently), so greedy
decoding may part ways with the standard cache where two logits are within 16-bit rounding.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import Cache, DynamicLayer

from littlebit.config import LittleBitError
from littlebit.core.layer import LittleBitLinear
from littlebit.core.packing import unpack_signs, untile_order
from littlebit.kernels import triton_available
from littlebit.runtime.packed import PackedLittleBitLinear

SUPPORTED_ATTENTION = ("LlamaAttention", "MistralAttention", "Qwen2Attention")
_LITTLEBIT = (PackedLittleBitLinear, LittleBitLinear)
_HOOK_ATTR = "_littlebit_latent_kv_hook"


def _expanded_on_gpu(proj: PackedLittleBitLinear, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``_folded_factors`` of a packed layer by the GEMM path's Triton expansion: one pass per factor
    writing ``dtype`` (also on CPU tensors under Triton's interpreter, as the tests run it)."""
    from littlebit.kernels.gpu.gemm import expanded_factors

    return expanded_factors(proj.u_signs, proj.v_signs, proj.h, proj.l, proj.g, dtype, proj.u_tiled)


def _folded_factors(proj: nn.Module, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(At, B)`` with ``proj(x) = (x At^T) B^T + bias``; At is (P*r, d_in), B is (d_out, P*r)."""
    with torch.no_grad():
        if isinstance(proj, LittleBitLinear):
            a, b = proj.folded_factors(torch.float32)
            return a.T.contiguous().to(dtype), b.to(dtype)
        # on the GPU in 16 bits: the unpacking below writes fp32 (P, r, d_in) and (P, d_out, r) first,
        # which ``keep_factors=False`` pays at every decoding step
        if proj.u_signs.is_cuda and dtype in (torch.float16, torch.bfloat16) and triton_available():
            return _expanded_on_gpu(proj, dtype)
        p, r = proj.n_paths, proj.rank
        sv = unpack_signs(proj.v_signs, proj.in_features)  # (P, r, d_in)
        at = sv * proj.l.float()[:, :, None] * proj.g.float()[:, None, :]
        su = unpack_signs(untile_order(proj.u_signs) if proj.u_tiled else proj.u_signs, r)  # (P, d_out, r)
        b = (su * proj.h.float()[:, :, None]).transpose(0, 1).reshape(proj.out_features, p * r)
        return at.reshape(p * r, proj.in_features).to(dtype), b.to(dtype)


class _Factors:
    """The folded factors of one LittleBit projection, kept across steps or rebuilt at each call."""

    def __init__(self, proj: nn.Module, keep: bool) -> None:
        self.proj, self.keep = proj, keep
        self._kept: tuple[torch.Tensor, torch.Tensor] | None = None

    def get(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        kept = self._kept
        if kept is not None and kept[0].dtype == like.dtype and kept[0].device == like.device:
            return kept
        factors = _folded_factors(self.proj, like.dtype)
        if self.keep:
            self._kept = factors
        return factors

    @property
    def bias(self) -> torch.Tensor | None:
        return self.proj.bias

    def nbytes(self) -> int:
        return sum(t.nbytes for t in self._kept) if self._kept is not None else 0


def _rope_into(out: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """``out = k * cos + rotate_half(k) * sin`` (the Llama convention), written in place into ``out``."""
    h = k.shape[-1] // 2
    k1, k2, o1, o2 = k[..., :h], k[..., h:], out[..., :h], out[..., h:]
    torch.mul(k1, cos[..., :h], out=o1)
    o1.addcmul_(k2, sin[..., :h], value=-1)
    torch.mul(k2, cos[..., h:], out=o2)
    o2.addcmul_(k1, sin[..., h:])


class _Stream:
    """K or V of one layer: latents ``(B, N, P*r)`` when ``factors`` is set, else states ``(B, H, N, D)``."""

    def __init__(self, factors: _Factors | None) -> None:
        self.factors = factors
        self.data: torch.Tensor | None = None

    @property
    def seq_dim(self) -> int:
        return 1 if self.factors is not None else 2

    def length(self) -> int:
        return 0 if self.data is None else self.data.shape[self.seq_dim]

    def rebuild_into(self, out: torch.Tensor, rope, b: torch.Tensor | None = None) -> None:
        """Write the cached tokens' states into ``out[:, :, :N]``, rotated by ``rope`` = (cos, sin)."""
        n = self.length()
        if self.factors is None:
            out[:, :, :n] = self.data
            return
        bsz, heads, _, dim = out.shape
        b = self.factors.get(self.data)[1] if b is None else b
        bias = None if self.factors.bias is None else self.factors.bias.to(self.data.dtype)
        past = F.linear(self.data, b, bias).to(out.dtype).view(bsz, n, heads, dim).transpose(1, 2)
        if rope is None:
            out[:, :, :n] = past
        else:
            cos, sin = rope
            _rope_into(out[:, :, :n], past, cos.unsqueeze(1), sin.unsqueeze(1))

    def append(self, states: torch.Tensor, x: torch.Tensor | None, rope) -> torch.Tensor:
        """Store the new tokens and return the states of every cached token, ``(B, H, N, D)``."""
        if self.factors is None:
            self.data = states if self.data is None else torch.cat([self.data, states], dim=-2)
            return self.data
        at, b = self.factors.get(x)
        z = F.linear(x, at)
        n = self.length()
        full = states
        if n:
            bsz, heads, t, dim = states.shape
            full = states.new_empty(bsz, heads, n + t, dim)
            self.rebuild_into(full, rope, b)
            full[:, :, n:] = states
        self.data = z if self.data is None else torch.cat([self.data, z], dim=1)
        return full

    def keep_first(self, n: int) -> None:
        if self.data is not None:
            self.data = self.data.narrow(self.seq_dim, 0, n)

    def map_batch(self, fn) -> None:
        if self.data is not None:
            self.data = fn(self.data)

    def nbytes(self) -> int:
        return 0 if self.data is None else self.data.nbytes


class LatentLayer(DynamicLayer):
    """One decoder layer's cache: each of k and v kept as latents (LittleBit projection) or as is."""

    def __init__(
        self,
        cache: LatentKVCache,
        layer_idx: int,
        k: _Factors | None = None,
        v: _Factors | None = None,
        heads: int = 0,
        head_dim: int = 0,
    ) -> None:
        super().__init__()
        self.cache, self.layer_idx = cache, layer_idx
        self.heads, self.head_dim = heads, head_dim
        self.k, self.v = _Stream(k), _Stream(v)
        self.latent = k is not None or v is not None
        self.standard_nbytes = 0  # bytes of the full K and V handed to attention at the last update

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x, rope = None, None
        if self.latent:
            x, position_ids = self.cache._take_input(self.layer_idx)
            rope = self.cache._rope(self.get_seq_length(), key_states.shape[-2], position_ids, key_states)
        keys = self.k.append(key_states, x, rope)
        values = self.v.append(value_states, x, None)
        self.is_initialized = True
        self.dtype, self.device = key_states.dtype, key_states.device
        self.standard_nbytes = keys.nbytes + values.nbytes
        return keys, values

    def get_seq_length(self) -> int:
        return self.k.length()

    def states(self) -> tuple[torch.Tensor, torch.Tensor]:
        """K (rotated) and V of every cached token, rebuilt: what a ``DynamicCache`` would hold."""
        n = self.get_seq_length()
        like = torch.empty(0, dtype=self.dtype, device=self.device)
        rope = self.cache._rope(n, 0, None, like)
        out = []
        for stream, r in ((self.k, rope), (self.v, None)):
            if stream.factors is None:
                out.append(stream.data)
                continue
            full = like.new_empty(stream.data.shape[0], self.heads, n, self.head_dim)
            stream.rebuild_into(full, r)
            out.append(full)
        return out[0], out[1]

    def nbytes(self) -> int:
        return self.k.nbytes() + self.v.nbytes()

    def reset(self) -> None:
        self.k.data = self.v.data = None
        self.is_initialized = False
        self.standard_nbytes = 0

    def crop(self, tokens_to_remove: int) -> None:
        # Negative: drop that many tokens (transformers 5); non-negative: the length to keep (older).
        n = self.get_seq_length()
        keep = max(0, n + tokens_to_remove) if tokens_to_remove < 0 else min(n, tokens_to_remove)
        self.k.keep_first(keep)
        self.v.keep_first(keep)

    def _map_batch(self, fn) -> None:
        self.k.map_batch(fn)
        self.v.map_batch(fn)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices])


def _capture_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
    # Found by type, not by name: depending on the transformers version, attention receives the cache as
    # ``past_key_value``, ``past_key_values`` or ``cache``, by keyword or by position.
    cache = next((a for a in (*kwargs.values(), *args) if isinstance(a, LatentKVCache)), None)
    if cache is not None:
        x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        cache._pending[module.layer_idx] = (x, kwargs.get("position_ids"))


def _unsupported_reason(attn: nn.Module) -> str | None:
    name = type(attn).__name__
    if getattr(attn, "k_norm", None) is not None:
        return f"{name} normalises k between the projection and the rotary embedding"
    if not all(isinstance(getattr(attn, n, None), nn.Module) for n in ("k_proj", "v_proj")):
        return f"{name} has no separate k_proj and v_proj (fused qkv projection?)"
    if name not in SUPPORTED_ATTENTION:
        return f"{name} is not one of the supported attention classes ({', '.join(SUPPORTED_ATTENTION)})"
    return None


def _rotary_module(model: nn.Module) -> nn.Module:
    rotary = {id(m): m for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding")}
    if len(rotary) != 1:
        raise LittleBitError(f"latent KV cache needs one rotary embedding module, found {len(rotary)}")
    module = next(iter(rotary.values()))
    rope_type = str(getattr(module, "rope_type", "default"))
    if "dynamic" in rope_type or "longrope" in rope_type:
        raise LittleBitError(
            f"latent KV cache does not support rope_type {rope_type!r}: its frequencies depend on the "
            "sequence length, so cached positions cannot be re-rotated exactly"
        )
    return module


def install_hooks(model: nn.Module) -> list[nn.Module]:
    """Check the architecture and hook every attention module that has a LittleBit k or v projection.

    Returns those attention modules. Idempotent; the hooks are inert unless a ``LatentKVCache`` is used.
    """
    found = []
    for name, m in model.named_modules():
        is_attention = type(m).__name__.endswith("Attention")
        if not is_attention or not any(isinstance(c, _LITTLEBIT) for c in m.modules()):
            continue
        reason = _unsupported_reason(m)
        if reason is not None:
            raise LittleBitError(f"latent KV cache cannot serve {name}: {reason}")
        if isinstance(m.k_proj, _LITTLEBIT) or isinstance(m.v_proj, _LITTLEBIT):
            found.append(m)
            if getattr(m, _HOOK_ATTR, None) is None:
                setattr(m, _HOOK_ATTR, m.register_forward_pre_hook(_capture_hook, with_kwargs=True))
    if not found:
        raise LittleBitError(f"{type(model).__name__} has no LittleBit k_proj/v_proj: no latents to cache")
    return found


def cache_argument(model: nn.Module) -> str:
    """The keyword under which ``model``'s forward (and so ``generate``) takes the cache.

    Newer transformers name it ``cache`` and only map ``past_key_values`` onto it with a deprecation
    warning; older ones know ``past_key_values`` alone.
    """
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class LatentKVCache(Cache):
    """A transformers ``Cache`` keeping k/v latents for LittleBit layers (see the module docstring).

    Build it with :meth:`for_model`, then pass it to ``generate`` or ``forward`` under the keyword
    :func:`cache_argument` names (``cache`` or, in older transformers, ``past_key_values``).
    """

    def __init__(self, model: nn.Module, keep_factors: bool = True) -> None:
        attns = {m.layer_idx: m for m in install_hooks(model)}
        self.rotary_emb = _rotary_module(model)
        n_layers = model.config.get_text_config().num_hidden_layers
        layers = []
        for i in range(n_layers):
            attn = attns.get(i)
            if attn is None:
                layers.append(LatentLayer(self, i))
                continue
            k, v = (
                _Factors(p, keep_factors) if isinstance(p, _LITTLEBIT) else None
                for p in (attn.k_proj, attn.v_proj)
            )
            heads = attn.k_proj.out_features // attn.head_dim
            layers.append(LatentLayer(self, i, k, v, heads, attn.head_dim))
        super().__init__(layers=layers)
        self.positions: torch.Tensor | None = None  # (B, N) int32, shared by every latent layer
        self._pending: dict[int, tuple] = {}
        self._rope_memo: tuple | None = None

    @classmethod
    def for_model(cls, model: nn.Module, keep_factors: bool = True) -> LatentKVCache:
        return cls(model, keep_factors)

    # ---- called from the hooks and the layers --------------------------------------------------------
    def _take_input(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        try:
            return self._pending.pop(layer_idx)
        except KeyError:
            raise LittleBitError(
                f"layer {layer_idx} updated the latent KV cache without its input being captured: build the "
                "cache with LatentKVCache.for_model(model) for this very model"
            ) from None

    def _rope(self, n_past: int, n_new: int, position_ids: torch.Tensor | None, like: torch.Tensor):
        """Record the new tokens' positions; cos/sin ``(B, n_past, D)`` of the cached ones (None if none)."""
        have = 0 if self.positions is None else self.positions.shape[1]
        if have < n_past + n_new:
            if have != n_past:
                raise LittleBitError(f"latent KV cache out of step: {have} positions for {n_past} tokens")
            if position_ids is None:
                position_ids = torch.arange(n_past, n_past + n_new, device=like.device)[None]
            new = position_ids[:, -n_new:].to(device=like.device, dtype=torch.int32)
            new = new.expand(like.shape[0], n_new)
            old = self.positions
            self.positions = new.contiguous() if old is None else torch.cat([old, new], 1)
        if n_past == 0:
            return None
        key = (n_past, like.dtype, like.device)
        if self._rope_memo is None or self._rope_memo[0] != key:
            dummy = torch.empty(0, dtype=like.dtype, device=like.device)
            self._rope_memo = (key, self.rotary_emb(dummy, self.positions[:, :n_past]))
        return self._rope_memo[1]

    # ---- Cache interface: keep the shared positions in step with the layers --------------------------
    def _positions_changed(self, fn=None) -> None:
        self._rope_memo = None
        if self.positions is not None and fn is not None:
            self.positions = fn(self.positions)

    def reset(self) -> None:
        super().reset()
        self.positions, self._pending = None, {}
        self._positions_changed()

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        n = self.get_seq_length()
        self._positions_changed(lambda p: p[:, :n])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._positions_changed(lambda p: p.index_select(0, beam_idx.to(p.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._positions_changed(lambda p: p.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._positions_changed(lambda p: p[indices])

    # ---- measurements ----------------------------------------------------------------------------------
    def _tokens(self) -> int:
        """Cached tokens summed over the batch rows."""
        if self.positions is not None:
            return self.positions.numel()
        first = next((layer for layer in self.layers if layer.get_seq_length()), None)
        return 0 if first is None else first.k.data.shape[0] * first.get_seq_length()

    def nbytes(self) -> int:
        """Bytes held for the cached tokens: every layer's latents or states, and the positions."""
        positions = 0 if self.positions is None else self.positions.nbytes
        return sum(layer.nbytes() for layer in self.layers) + positions

    def workspace_bytes(self) -> int:
        """Bytes held that do not grow with the context: the kept dense factors and the cos/sin memo."""
        factors = sum(s.factors.nbytes() for layer in self.layers for s in (layer.k, layer.v) if s.factors)
        memo = 0 if self._rope_memo is None else sum(t.nbytes for t in self._rope_memo[1])
        return factors + memo

    def layer_bytes_per_token(self) -> list[tuple[float, float]]:
        """Per layer ``(latent, standard)`` bytes per cached token, measured from the tensors.

        "standard" is the size of the full K and V this layer handed to attention at its last update:
        exactly what a ``DynamicCache`` would hold for the same tokens.
        """
        tokens = self._tokens()
        return [(layer.nbytes() / tokens, layer.standard_nbytes / tokens) for layer in self.layers]

    def bytes_per_token_report(self) -> dict:
        tokens = self._tokens()
        if tokens == 0:
            raise LittleBitError("the latent KV cache is empty: nothing has been generated with it yet")
        latent = self.nbytes() / tokens
        standard = sum(layer.standard_nbytes for layer in self.layers) / tokens
        return {
            "cache_bytes_per_token": latent,
            "cache_bytes_per_token_standard": standard,
            "cache_compression": standard / latent,
            "cache_tokens": tokens,
            "cache_latent_layers": sum(layer.latent for layer in self.layers),
            "cache_workspace_bytes": self.workspace_bytes(),
        }
