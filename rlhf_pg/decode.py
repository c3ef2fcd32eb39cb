"""A lean decoding step for Llama-architecture causal LMs (Llama, SmolLM, Mistral without a sliding
window, Qwen2), used by the rollout (``rollout.decode``).

Sampling one token for 32 rows runs the whole model for 32 positions: 7 small matmuls per layer, and
around them, in a transformers forward, ~40 other ops per layer (mask building, rotary tables, cache
concatenation, autocast's casts of activations and of the whole fp32 key cache at every step). On a
2-core CPU that bookkeeping costs about as much as the matmuls. This module runs the same arithmetic
with the model's own weights and nothing else:

* the KV cache is preallocated for the prompt plus ``max_new_tokens`` and written in place (no
  ``torch.cat`` of the growing cache at every token), keys stored already rotated, in the compute dtype;
* rotary cos/sin come from the model's own ``inv_freq`` for the positions being fed, once per step
  (not once per layer);
* under bf16 autocast the weights are cast by autocast itself (once per sampling call: its cache of
  weight casts), the keys and values stored in bf16 (transformers keeps fp32 rotated keys and autocast
  re-casts the whole key cache at every step);
* attention is ``scaled_dot_product_attention`` on the cached prefix with the query heads grouped per
  key head, as transformers' sdpa path does for one query position;
* on CPUs with AMX, in bf16, each weight is cast and reordered once per decoder into oneDNN's blocked
  layout for the decoding steps (:func:`prepacks_weights`): with plain bf16 weights the step's small-row
  products took a third longer or more here. The same sums, in the same order where oneDNN splits both
  products between threads alike (with 2 threads here: at least up to 95 rows).

The arithmetic is the transformers forward's, op for op and dtype for dtype (fp32 residual stream and
norms under autocast, bf16 matmuls, the same SDPA kernels), so the sampled tokens and their log-probs
equal the model's own bit for bit (tests/test_decode.py, tests/test_envs.py; fp32 and bf16). One
exception: when no column of the batch is padding, transformers switches one-query attention to SDPA's
``enable_gqa`` kernel, 3-4x slower here than the grouped query heads this module keeps; the log-probs
then agree to rounding (~1e-6 in fp32), not to the bit. Models it does not
cover (other architectures, quantized or sharded weights, LoRA adapters not merged, rotary scaling)
are decoded by the model's own forward: :func:`unsupported` says why.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
"""Model classes whose forward this module reproduces (same layer structure, norms and rotary)."""


def unsupported(model: torch.nn.Module) -> str | None:
    """Why ``model`` cannot be decoded by :class:`LeanDecoder` (None: it can)."""
    name = type(model).__name__
    if name not in ARCHITECTURES:
        return f"{name} is not one of the architectures it covers ({', '.join(ARCHITECTURES)})"
    c = model.config
    attention = getattr(c, "_attn_implementation", None)
    if attention != "sdpa":
        return f"it runs {attention!r} attention (the lean step reproduces 'sdpa')"
    rope = getattr(c, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        return f"rotary scaling {rope.get('rope_type')!r} is not covered"
    if getattr(c, "hidden_act", "silu") != "silu":
        return f"activation {c.hidden_act!r} is not covered"
    if getattr(c, "mlp_bias", False) or getattr(c, "pretraining_tp", 1) != 1:
        return "MLP biases / tensor-parallel pretraining slices are not covered"
    if getattr(c, "sliding_window", None) and getattr(c, "use_sliding_window", True):
        return "sliding-window attention is not covered"
    if getattr(c, "layer_types", None) and any(t != "full_attention" for t in c.layer_types):
        return "layers other than full attention are not covered"
    for p in model.parameters():
        if not p.is_floating_point() or p.numel() == 0 or type(p.data) is not torch.Tensor:
            return "its weights are quantized, sharded or wrapped"
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        return "it has no model.layers"
    for i, layer in enumerate(layers):
        for path in _PROJECTIONS:
            module = layer.get_submodule(path)
            if type(module) is not torch.nn.Linear:
                return (
                    f"layer {i}'s {path} is a {type(module).__module__}.{type(module).__qualname__}, not a "
                    "torch.nn.Linear (adapters or quantized layers)"
                )
    return None


_PROJECTIONS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


@dataclass
class _Layer:
    in_norm: torch.Tensor
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    q_bias: torch.Tensor | None
    k_bias: torch.Tensor | None
    v_bias: torch.Tensor | None
    o: torch.Tensor
    post_norm: torch.Tensor
    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor


class LeanDecoder:
    """Feeds token chunks to ``model`` with its own preallocated KV cache and returns next-token logits.

    It runs in the caller's autocast state, as the model's forward would. ``dtype`` (the matmul dtype,
    :func:`matmul_dtype`) is the cache's; the residual stream, the norms and the rotary arithmetic keep
    the embedding's dtype, as in the transformers forward under autocast."""

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype):
        reason = unsupported(model)
        if reason is not None:
            raise ValueError(f"LeanDecoder: {reason}")
        c = model.config
        self.n_heads, self.n_kv = c.num_attention_heads, c.num_key_value_heads
        self.head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        self.eps, self.dtype = c.rms_norm_eps, dtype
        w = dict(model.named_parameters())  # the parameters themselves: autocast caches casts of leaves only
        base = "model."
        self.embed = model.get_input_embeddings().weight
        self.norm = w[base + "norm.weight"]
        self.head = w["lm_head.weight"] if "lm_head.weight" in w else w[base + "embed_tokens.weight"]
        rotary = model.model.rotary_emb
        self.inv_freq, self.rope_scale = rotary.inv_freq, rotary.attention_scaling
        self.layers = []
        for i in range(c.num_hidden_layers):
            p = f"{base}layers.{i}."
            self.layers.append(
                _Layer(
                    in_norm=w[p + "input_layernorm.weight"],
                    q=w[p + "self_attn.q_proj.weight"],
                    k=w[p + "self_attn.k_proj.weight"],
                    v=w[p + "self_attn.v_proj.weight"],
                    q_bias=w.get(p + "self_attn.q_proj.bias"),
                    k_bias=w.get(p + "self_attn.k_proj.bias"),
                    v_bias=w.get(p + "self_attn.v_proj.bias"),
                    o=w[p + "self_attn.o_proj.weight"],
                    post_norm=w[p + "post_attention_layernorm.weight"],
                    gate=w[p + "mlp.gate_proj.weight"],
                    up=w[p + "mlp.up_proj.weight"],
                    down=w[p + "mlp.down_proj.weight"],
                )
            )
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.valid: torch.Tensor | None = None  # (B, capacity) bool: columns a query may attend to
        self.length = 0  # filled columns
        self.packed: dict[int, torch.Tensor] | None = None  # id(weight) → prepacked copy (made by start)
        self.cast: dict[int, torch.Tensor] = {}  # id(weight) → its plain bf16 copy, beside the prepacked one

    # ------------------------------------------------------------------------------- the cache
    def start(self, batch: int, capacity: int, device) -> None:
        """An empty cache for ``batch`` rows of up to ``capacity`` tokens (and, where it pays, the weights
        prepacked for products of about ``batch`` rows: :func:`prepacks_weights`)."""
        if self.packed is None:
            self.packed = {}
            if prepacks_weights(torch.device(device), self.dtype):
                weights = [self.head] + [t for layer in self.layers for t in (layer.q, layer.k, layer.v, layer.o)]
                weights += [t for layer in self.layers for t in (layer.gate, layer.up, layer.down)]
                for w in weights:
                    # the cast autocast would make (so it casts nothing here), for the products of many rows,
                    # and oneDNN's layout of it for the decoding steps
                    self.cast[id(w)] = w.detach().to(self.dtype)
                    self.packed[id(w)] = torch.ops.mkldnn._reorder_linear_weight(self.cast[id(w)], batch)
        shape = (batch, self.n_kv, capacity, self.head_dim)
        self.keys = [torch.empty(shape, dtype=self.dtype, device=device) for _ in self.layers]
        self.values = [torch.empty(shape, dtype=self.dtype, device=device) for _ in self.layers]
        self.valid = torch.zeros((batch, capacity), dtype=torch.bool, device=device)
        self.length = 0

    def _reserve(self, length: int) -> None:
        """Room for ``length`` columns: the buffers grow (doubling) when a feed would overflow them."""
        capacity = self.valid.shape[1]
        if length <= capacity:
            return
        grow = max(length, 2 * capacity) - capacity

        def wider(x: torch.Tensor) -> torch.Tensor:
            return torch.cat([x, x.new_zeros((*x.shape[:2], grow, *x.shape[3:]))], dim=2)

        self.keys = [wider(k) for k in self.keys]
        self.values = [wider(v) for v in self.values]
        self.valid = torch.cat([self.valid, self.valid.new_zeros((self.valid.shape[0], grow))], dim=1)

    def select(self, rows: torch.Tensor) -> None:
        """Keep only cache rows ``rows`` (in that order): finished rows leave, prompts repeat G times."""
        self.keys = [k.index_select(0, rows) for k in self.keys]
        self.values = [v.index_select(0, rows) for v in self.values]
        self.valid = self.valid.index_select(0, rows)

    # ------------------------------------------------------------------------------ the forward
    def _rms(self, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        x = h.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return weight * x.to(h.dtype)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin

    @torch.no_grad()
    def feed(self, ids: torch.Tensor, real: torch.Tensor, positions: torch.Tensor, last_only: bool = True):
        """Append ``ids`` (B, n) at ``positions`` (B, n); ``real`` (B, n) marks the columns later queries
        may attend to (0 = padding). Returns the logits (B, V) of the last column (``last_only``) or
        (B, n, V), in the matmul dtype (as the model's forward under autocast)."""
        B, n = ids.shape
        L0, L1 = self.length, self.length + n
        H, Hkv, D = self.n_heads, self.n_kv, self.head_dim
        self._reserve(L1)
        self.valid[:, L0:L1] = real.bool()
        freqs = positions[..., None].float() * self.inv_freq.to(ids.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        h = F.embedding(ids, self.embed)  # (B, n, d): the residual stream's dtype is the embedding's
        cos, sin = (
            (emb.cos() * self.rope_scale).to(h.dtype)[:, None],
            (emb.sin() * self.rope_scale).to(h.dtype)[:, None],
        )
        # as transformers' sdpa path: no mask at all when no column is padding and the queries are one
        # column or the whole square (then the causal flag)
        attn_mask, causal = None, n > 1
        if not ((n == 1 or L0 == 0) and bool(self.valid[:, :L1].all())):
            # a query sees the valid columns up to its own, and always itself (padding queries stay finite)
            cols = torch.arange(L1, device=ids.device)
            own = torch.arange(L0, L1, device=ids.device)[:, None]
            allowed = (self.valid[:, None, :L1] & (cols[None, :] <= own)[None]) | (cols[None, :] == own)[None]
            attn_mask, causal = allowed[:, None], False  # (B, 1, n, L1)
        dt = self.dtype
        # prepacked weights in decoding steps only (one column per row): a prefill's hundreds of rows take
        # the plain product, which oneDNN splits between threads otherwise (see prepacks_weights)
        packed = self.packed if n == 1 and self.packed else {}

        def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
            p = packed.get(id(w))
            return F.linear(x, self.cast.get(id(w), w), b) if p is None else packed_linear(x, p, b)

        def grouped(x: torch.Tensor) -> torch.Tensor:  # (B, H, 1, D) → (B, Hkv, H/Hkv, D)
            return x.view(B, Hkv, H // Hkv, D)

        def repeat(x: torch.Tensor) -> torch.Tensor:  # (B, Hkv, L, D) → (B, H, L, D), as repeat_kv
            return x[:, :, None].expand(B, Hkv, H // Hkv, *x.shape[2:]).reshape(B, H, *x.shape[2:])

        for i, w in enumerate(self.layers):
            x = self._rms(h, w.in_norm).to(dt)
            q = linear(x, w.q, w.q_bias).view(B, n, H, D).transpose(1, 2)
            k = linear(x, w.k, w.k_bias).view(B, n, Hkv, D).transpose(1, 2)
            v = linear(x, w.v, w.v_bias).view(B, n, Hkv, D).transpose(1, 2)
            q, k = self._rotate(q, cos, sin), self._rotate(k, cos, sin)
            self.keys[i][:, :, L0:L1] = k  # rotated, in the cache's dtype (cast once, not at every step)
            self.values[i][:, :, L0:L1] = v
            keys, values = self.keys[i][:, :, :L1], self.values[i][:, :, :L1]
            if n == 1:  # one query per row: the query heads grouped under their key head (no key repeat)
                a = F.scaled_dot_product_attention(grouped(q.to(dt)), keys, values, attn_mask=attn_mask)
            elif attn_mask is None:  # a prefill without padding: the causal kernel, as transformers runs it
                a = F.scaled_dot_product_attention(q.to(dt), keys, values, is_causal=causal, enable_gqa=True)
            else:
                a = F.scaled_dot_product_attention(q.to(dt), repeat(keys), repeat(values), attn_mask=attn_mask)
            a = a.reshape(B, H, n, D).transpose(1, 2).reshape(B, n, H * D)
            h = h + linear(a, w.o)
            x = self._rms(h, w.post_norm).to(dt)
            h = h + linear(F.silu(linear(x, w.gate)) * linear(x, w.up), w.down)
        self.length = L1
        if last_only:
            h = h[:, -1]
        return linear(self._rms(h, self.norm).to(dt), self.head)


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear`` of ``x`` (bf16) by a weight prepacked with ``torch.ops.mkldnn._reorder_linear_weight``."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, None if bias is None else bias.to(x.dtype), "none", [], "")


def prepacks_weights(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether :class:`LeanDecoder` prepacks its weights: bf16 products on a CPU with AMX tiles (oneDNN).

    ``.venv/bin/python scripts/measure_levers.py --prepacked`` on a 2-core Xeon with AMX-BF16 (the 211 linears
    of SmolLM2-135M, model-sized weights, 2 threads; two runs): one decoding step's products took 30.9 against
    40.4–41.9 ms at 32 rows, 20.6–27.3 against 35.9–38.2 at 9 rows, 83–97 against 96–102 at 240 (a prefill);
    reordering the whole model took 0.13 s, once per decoder. On an AMD EPYC with AVX512-BF16 but no AMX an
    earlier measurement found no shape faster prepacked, so it is off there; in fp32 oneDNN's prepacked
    products differ from the plain ones by rounding.

    The prepacked product is the same sum as the plain one, in the same order, as long as oneDNN splits it
    between threads the same way for both layouts. The same command checks the model's shapes with random
    data: bit-equal at every row count tried with 1 thread; with 2 threads some shapes differ from 96 rows on
    in one run, from 296 in the other (the data decide whether a different order shows); with 16 threads the
    1536 → 576 product differed from 14 rows. Hence the prefill (hundreds of rows) takes the plain product,
    and with 2 threads the samples are the model's forward's bit for bit (tests/test_decode.py runs one
    thread); with many threads they agree to rounding."""
    return (
        device.type == "cpu"
        and dtype == torch.bfloat16
        and torch.backends.mkldnn.is_available()
        and torch.cpu._is_amx_tile_supported()
    )


def matmul_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype the model's matmuls run in here: autocast's when it is on, else the weights'."""
    device = next(model.parameters()).device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return next(model.parameters()).dtype
