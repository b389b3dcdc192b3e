"""What the appendix-E baselines need besides the router: DES medians, ODP key tokens, RICE experts.

- DES (appendix E.2): per MoE layer, the medians of r(j)/r(j+1), j = k_lo..k_hi-1, over the routing
  weights of a calibration set's tokens (`routing.des_thresholds`; bounds `routing.des_bounds`,
  4..6 for K_base 8, scaled for other K_base).
- ODP: DES plus key-token protection. The key-token metric is the one in ODP's reference code
  (Mixture Compressor, Huang et al. 2024, `models/wrapper.py`): at prefill, token j's score is the
  attention it receives, averaged over heads and over the queries that can see it, times the L1
  norm of its hidden state at the MoE input; the top `protect` fraction of each sequence's tokens
  are key and keep all k_hi experts. Decode steps (one new token) have no key tokens, as there.
  Two documented departures: the reference code floors protect x length (no token is protected in a
  prompt under 50 tokens at 2%), we take the ceiling, so every prompt protects at least one token;
  and the reference sums over the key axis of its [query, key] mean, which is 1 for every row of a
  softmax, where we sum over queries (what "attention a token receives" means).
  Attention weights exist only under eager attention: ODP switches the model to it while it runs.
- RICE: cognitive experts by normalised PMI between an expert's selection and marker tokens
  (RICE's `<think>`/`</think>` where the tokenizer has them, else markers the user gives), the top
  `top` (layer, expert) pairs over all layers; `routing.rice` multiplies their weight by `factor`.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch

from banpick_cli.passes.batches import batches
from banpick_cli.errors import BadSetting, DataError
from banpick_cli.models.base import RoutingHooks
from banpick_cli.models.loading import LoadedModel
from banpick_cli.routing import des_bounds, des_thresholds, probs

THINK_MARKERS = ("<think>", "</think>")


@torch.inference_mode()
def des_calibration(
    loaded: LoadedModel, texts: Sequence[str], *, seq_len: int = 256, batch_size: int = 8,
    k_lo: int | None = None, k_hi: int | None = None,
) -> torch.Tensor:
    """Returns DES thresholds [moe_layers, k_hi - k_lo] (float32): per-layer medians on the texts' real tokens."""
    k_base = loaded.routing.top_k
    if k_lo is None or k_hi is None:
        k_lo, k_hi = des_bounds(k_base)
    specs = loaded.router_specs()
    kept: list[list[torch.Tensor]] = [[] for _ in specs]  # per layer: each batch's top-k_hi scores [T, k_hi]
    mask: dict[str, torch.Tensor | None] = {"real": None}

    def observe(position: int, logits: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> None:
        p = probs(logits, specs[position])
        real = mask["real"]
        if real is not None and real.shape[0] == p.shape[0]:
            p = p[real.to(p.device)]
        # The k_hi largest scores decide every ratio des_thresholds takes; keeping only them saves memory.
        kept[position].append(torch.topk(p.float(), k_hi, dim=-1).values.cpu())

    decoder = loaded.adapter.decoder(loaded.model)
    with RoutingHooks(loaded.layers, loaded.routing.num_experts, observers=[observe]):
        for batch in batches(loaded.tokenizer, list(texts), seq_len=seq_len, batch_size=batch_size, device=loaded.device):
            mask["real"] = batch.attention_mask.reshape(-1).bool()
            decoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    if not kept[0]:
        raise DataError("DES needs calibration text; none was given")
    return torch.stack([des_thresholds(torch.cat(rows), k_lo, k_hi) for rows in kept])


class OdpKeyTokens:
    """ODP's key-token mask for the router call in progress: a callable `(tokens) -> bool [tokens]`.

    Hooks: a pre-hook on the decoder reads the attention mask; a hook on each MoE layer's attention
    keeps its weights [B, heads, q, kv]; a pre-hook on the router computes the mask from them and the
    router's input. The routing plan calls the object for the key tokens of the current layer.
    """

    def __init__(self, loaded: LoadedModel, protect: float = 0.02):
        if not 0 <= protect <= 1:
            raise BadSetting(f"--odp-protect must be in [0, 1], got {protect}")
        self.loaded = loaded
        self.protect = protect
        self._attention_mask: torch.Tensor | None = None
        self._attn: torch.Tensor | None = None
        self._current: torch.Tensor | None = None
        self._handles: list = []
        self.protected = 0  # key tokens marked so far (over layers), for the report
        self.routed = 0

    def __call__(self, tokens: int) -> torch.Tensor:
        current = self._current
        if current is None or current.shape[0] != tokens:
            return torch.zeros(tokens, dtype=torch.bool)
        return current

    def install(self) -> "OdpKeyTokens":
        model = self.loaded.model
        decoder = self.loaded.adapter.decoder(model)
        self._handles.append(decoder.register_forward_pre_hook(self._read_mask, with_kwargs=True))
        for layer in self.loaded.layers:
            attention = decoder.layers[layer.layer_index].self_attn
            self._handles.append(attention.register_forward_hook(self._keep_attention))
            self._handles.append(layer.router.register_forward_pre_hook(self._mark))
        return self

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _read_mask(self, module, args, kwargs) -> None:
        mask = kwargs.get("attention_mask")
        self._attention_mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None

    def _keep_attention(self, module, args, output) -> None:
        weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        self._attn = weights if isinstance(weights, torch.Tensor) and weights.dim() == 4 else None

    def _mark(self, module, args) -> None:
        hidden = args[0]
        self._current = None
        attn = self._attn
        if attn is None or hidden.dim() != 2:
            return
        b, _, q, kv = attn.shape
        if q < 2 or q != kv or hidden.shape[0] != b * q:
            return  # a decode step (or a cached prefix): no key tokens, as in ODP's code
        real = torch.ones(b, q, dtype=torch.bool, device=attn.device)
        if self._attention_mask is not None and self._attention_mask.shape == (b, q):
            real = self._attention_mask.to(attn.device).bool()
        key = odp_key_tokens(attn, hidden.view(b, q, -1), real, self.protect)
        self._current = key.reshape(-1)
        self.protected += int(key.sum())
        self.routed += int(real.sum())


def odp_key_tokens(attn: torch.Tensor, hidden: torch.Tensor, real: torch.Tensor, protect: float) -> torch.Tensor:
    """Returns ODP's key tokens bool [B, q] from attention [B, H, q, q], hidden states [B, q, D], real [B, q].

    score_j = (sum over real queries i >= j of mean-over-heads A[i, j]) / (real queries i >= j) * |x_j|_1;
    the ceil(protect * real tokens) highest-scoring real tokens of each sequence are key.
    """
    a = attn.float().mean(1) * real[:, :, None]  # [B, q, kv]: rows of padding queries dropped
    received = a.sum(1)  # [B, kv]
    seen_by = real.flip(-1).cumsum(-1).flip(-1).clamp(min=1)  # real queries at or after each position
    score = received / seen_by * hidden.float().abs().sum(-1).to(received.device)
    score = score.masked_fill(~real, float("-inf"))
    key = torch.zeros_like(real)
    for row in range(real.shape[0]):
        n = math.ceil(protect * int(real[row].sum())) if protect > 0 else 0
        if n:
            key[row, torch.topk(score[row], n).indices] = True
    return key & real


@contextmanager
def odp_session(loaded: LoadedModel, protect: float = 0.02) -> Iterator[OdpKeyTokens]:
    """Yields ODP's key-token provider with eager attention switched on (and restored afterwards)."""
    model = loaded.model
    previous = getattr(model.config, "_attn_implementation", None)
    try:
        model.set_attn_implementation("eager")
    except (AttributeError, ValueError) as err:
        raise BadSetting(f"ODP needs attention weights (eager attention), which this model cannot switch to: {err}") from None
    provider = OdpKeyTokens(loaded, protect).install()
    try:
        yield provider
    finally:
        provider.remove()
        if previous and previous != "eager":
            model.set_attn_implementation(previous)


def marker_token_ids(tokenizer, markers: Sequence[str] | None) -> list[int]:
    """Returns the ids of RICE's marker tokens (with and without a leading space), else <think>/</think>."""
    wanted = list(markers) if markers else [m for m in THINK_MARKERS if m in tokenizer.get_vocab()]
    if not wanted:
        raise BadSetting("rice needs marker tokens: this tokenizer has no <think>; pass --rice-markers 'Wait,Alternatively'")
    ids: list[int] = []
    for marker in wanted:
        # a word is one token at the start of a text and often another after a space: count both
        spellings = [tokenizer(m, add_special_tokens=False).input_ids for m in (marker, " " + marker.strip())]
        single = [found[0] for found in spellings if len(found) == 1]
        if not single:
            raise BadSetting(f"--rice-markers: '{marker}' is more than one token for this tokenizer; give single-token markers")
        ids += [i for i in single if i not in ids]
    return ids


@torch.inference_mode()
def rice_cognitive_experts(
    loaded: LoadedModel, texts: Sequence[str], markers: Sequence[str] | None = None, *, top: int = 2,
    seq_len: int = 256, batch_size: int = 8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (cognitive experts bool [M, E], nPMI float32 [M, E]) from the texts' real tokens.

    nPMI(x, e) = log2(p(x, e) / (p(x) p(e))) / -log2 p(x, e), x = "the token is a marker", e = "expert
    e is selected", probabilities over (token, layer) positions; the `top` highest pairs are kept.
    """
    marker_ids = torch.tensor(marker_token_ids(loaded.tokenizer, markers))
    m, e = len(loaded.layers), loaded.routing.num_experts
    joint = torch.zeros(m, e, dtype=torch.float64)
    chosen = torch.zeros(m, e, dtype=torch.float64)
    counts = {"markers": 0, "tokens": 0}
    state: dict[str, torch.Tensor | None] = {"real": None, "is_marker": None}

    def observe(position: int, logits: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> None:
        sel = torch.nn.functional.one_hot(indices.clamp(max=e), e + 1)[..., :e].sum(1).double().cpu()  # [T, E]
        real = state["real"].cpu()
        sel = sel[real]
        is_marker = state["is_marker"].cpu()[real]
        chosen[position] += sel.sum(0)
        joint[position] += sel[is_marker].sum(0)

    decoder = loaded.adapter.decoder(loaded.model)
    with RoutingHooks(loaded.layers, e, observers=[observe]):
        for batch in batches(loaded.tokenizer, list(texts), seq_len=seq_len, batch_size=batch_size, device=loaded.device):
            real = batch.attention_mask.reshape(-1).bool()
            is_marker = torch.isin(batch.input_ids.reshape(-1).cpu(), marker_ids)
            state["real"], state["is_marker"] = real, is_marker
            counts["markers"] += int((is_marker & real.cpu()).sum())
            counts["tokens"] += int(real.sum())
            decoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    if counts["markers"] == 0:
        raise DataError("rice: no marker token occurs in the calibration text; choose other --rice-markers or data")
    n = float(counts["tokens"])
    p_xy, p_x, p_y = joint / n, counts["markers"] / n, chosen / n
    with torch.no_grad():
        npmi = torch.log2(p_xy / (p_x * p_y)) / -torch.log2(p_xy)
    npmi = torch.where(p_xy > 0, npmi, torch.full_like(npmi, -1.0)).float()
    flat = npmi.flatten()
    picked = torch.zeros(m * e, dtype=torch.bool)
    picked[torch.topk(flat, min(top, flat.numel())).indices] = True
    return picked.view(m, e), npmi
