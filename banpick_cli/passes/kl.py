"""The shared KL engine: the top-1000 KL of appendix B for many one-layer routing variants of a model.

A variant changes how one MoE layer l routes and nothing before it. The engine runs the unmodified
model once per batch (pass 1) and keeps only what later work needs: the top-k logits of its output
(values and token ids, never the full [tokens, vocab] logits), the arguments the model passed each
decoder layer (rotary embeddings, causal mask), and the hidden state at the input of the scanned
layers. Each variant then replays decoder layers l..end from that hidden state, then the final norm
and LM head; the variants of one layer are stacked along the batch dimension, each replica routed by
its own rule at layer l. The work is one forward for pass 1 plus sum over variants of (L - l)/L
forwards, plus at most one more when the stored hidden states are capped by `hidden_cache_mb` (the
later layers' inputs are then recomputed from the last stored one, never from the embeddings).

`naive_kl` is the slow reference, one full forward per variant and batch; tests hold the engine equal
to it to float32 rounding on every family.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from banpick_cli.passes.batches import Batch, batches
from banpick_cli.models.base import ObserveFn, RoutingHooks
from banpick_cli.models.loading import LoadedModel
from banpick_cli.progress import ProgressEvent, ProgressFn, silent

TOP_TOKENS = 1000  # appendix B
# LM-head outputs (floats) materialised at once: 8 MiB in float32 on a CPU (stays in cache), 512 MiB on a GPU.
LOGITS_BUDGET = {"cpu": 1 << 21, "cuda": 1 << 27}

# Routes one MoE layer for a variant: router logits [T, E] -> (weights [T, W], indices [T, W]),
# what the experts use instead of the router's choice; index == num_experts is "no expert".
RouteVariant = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class LayerPlan:
    """The variants of one MoE layer (its position): each routes that layer its own way, the rest as usual."""

    position: int
    variants: tuple[RouteVariant, ...]


def top_targets(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns the k largest logits per row and their token ids: ([N, k] float32, [N, k] int32).

    All that is kept of the unmodified model's output: p' is the softmax of these k logits, and q'
    the softmax of the modified model's logits at the same ids (the vocabulary normaliser cancels).
    """
    values, indices = torch.topk(logits.float(), k, dim=-1)
    return values, indices.int()


def target_log_probs(values: torch.Tensor) -> torch.Tensor:
    """Returns log p' [N, k] (float64): p restricted to its top-k set and renormalised, from its top-k logits."""
    return torch.log_softmax(values.double(), dim=-1)


def topk_kl(log_p: torch.Tensor, indices: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Returns D_KL(p' || q') per row [N] (float64, natural log): appendix B's top-k KL.

    `log_p` [N, k] is log p' (`target_log_probs`) on the token ids `indices` [N, k]; q' is the modified
    model's `logits` [N, V] restricted to the same ids and renormalised (a softmax over them).
    """
    log_q = torch.log_softmax(logits.gather(1, indices.long()).double(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1)


@dataclass
class _Stored:
    """What pass 1 keeps of one batch."""

    mask: torch.Tensor  # bool [B, T]: real (non-padding) tokens
    offsets: list[int]  # row b's real tokens are rows offsets[b]:offsets[b+1] of values/indices
    values: torch.Tensor  # [N, k] float32: the unmodified model's top-k logits per real token
    indices: torch.Tensor  # [N, k] int32: their token ids
    kwargs: dict[int, dict[str, Any]]  # decoder-layer index -> keyword arguments the model passed it
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)  # layer index -> its input [B, T, H]

    @property
    def rows(self) -> int:
        return self.mask.shape[0]

    @property
    def tokens(self) -> int:
        return self.offsets[-1]


class KLEngine:
    """Top-k KL of one-layer routing variants against the unmodified model, on one calibration set.

    `stack` variants of a layer share one forward (rows = stack x batch_size); 0 picks 8 on a GPU, where
    bigger forwards amortise kernel launches, and 2 on a CPU, where they fall out of cache (measured in
    docs/benchmarks.md). On a GPU out-of-memory the engine halves the variants per forward, then the
    texts, and goes on; `notes` says so. Hidden states are parked on the CPU when the model is on a GPU;
    `hidden_cache_mb` caps them. Texts are batched longest first (`sort_by_length`), so the padding
    that every variant's replay pays again stays small.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        texts: Sequence[str],
        *,
        seq_len: int,
        batch_size: int = 8,
        top_tokens: int = TOP_TOKENS,
        stack: int = 0,
        hidden_cache_mb: int = 2048,
        sort_by_length: bool = True,
        progress: ProgressFn = silent,
    ):
        self.loaded = loaded
        # Batches of texts of similar length waste little on padding, and every replay of every variant
        # pays for the padding again; the mean over tokens does not depend on the order.
        self.texts = _longest_first(loaded.tokenizer, list(texts), seq_len) if sort_by_length else list(texts)
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.stack = stack or (8 if loaded.device.type == "cuda" else 2)
        self.row_limit: int | None = None  # texts per forward, set only after an out-of-memory
        self.hidden_cache_mb = hidden_cache_mb
        self.progress = progress
        self.notes: list[str] = []
        self.decoder = loaded.adapter.decoder(loaded.model)
        self.norm, self.head = loaded.adapter.output_head(loaded.model)
        self.vocab = int(self.head.weight.shape[0])
        self.top_tokens = min(top_tokens, self.vocab)
        if top_tokens > self.vocab:
            self.notes.append(f"--top-tokens {top_tokens} is larger than the vocabulary ({self.vocab}); using {self.vocab}")
        self.park = torch.device("cpu") if loaded.device.type == "cuda" else loaded.device
        self._tokens: int | None = None
        self.variant_tokens = 0  # tokens run through modified layers so far (for tokens/s)

    @property
    def tokens(self) -> int:
        """Returns the number of real tokens in the calibration set (each KL is a mean over them)."""
        if self._tokens is None:
            self._tokens = sum(b.tokens for b in batches(self.loaded.tokenizer, self.texts, seq_len=self.seq_len,
                                                         batch_size=self.batch_size, device=torch.device("cpu")))
        return self._tokens

    # --- the scan --------------------------------------------------------------------------------
    @torch.inference_mode()
    def run(
        self,
        plans: Sequence[LayerPlan],
        *,
        observers: Sequence[ObserveFn] = (),
        on_layer: Callable[[int, torch.Tensor], None] | None = None,
    ) -> dict[int, torch.Tensor]:
        """Returns position -> mean top-k KL of each variant [n] (float64) over every real token.

        Layers run in order; `on_layer(position, kl)` is called as each finishes (to checkpoint).
        `observers` see the unmodified routing of every MoE layer in pass 1, real tokens only.
        """
        plans = sorted(plans, key=lambda p: p.position)
        if not plans and not observers:
            return {}
        index = {layer.position: layer.layer_index for layer in self.loaded.layers}
        starts = [index[plan.position] for plan in plans]
        results: dict[int, torch.Tensor] = {}
        with RoutingHooks(self.loaded.layers, self.loaded.routing.num_experts) as hooks:
            stored = self._base_pass(hooks, starts, observers)
            for n, (plan, start) in enumerate(zip(plans, starts)):
                self._advance(hooks, stored, start)
                results[plan.position] = kl = self._scan_layer(hooks, plan, start, stored)
                if on_layer is not None:
                    on_layer(plan.position, kl)
                self.progress(ProgressEvent("layers", n + 1, len(plans), note=f"L{start}"))
        return results

    def _base_pass(self, hooks: RoutingHooks, starts: list[int], observers: Sequence[ObserveFn]) -> list[_Stored]:
        layers = self.decoder.layers
        first = min(starts) if starts else len(layers)
        cached = set(self._cached(starts))
        capture: dict[str, dict] = {}

        def pre_hook(index: int):
            def hook(module, args, kwargs):
                capture["kwargs"][index] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
                if index in cached:
                    capture["hidden"][index] = (args[0] if args else kwargs["hidden_states"]).to(self.park)

            return hook

        # Observer calls wait in `pending` until their batch succeeds, so an out-of-memory retry
        # never shows an observer the same tokens twice.
        pending: list[tuple] = []
        real: dict[str, torch.Tensor] = {}

        def observe(position, logits, weights, indices):
            m = real["flat"].to(logits.device)
            pending.append((position, logits[m], weights[m], indices[m]))

        handles = [layers[i].register_forward_pre_hook(pre_hook(i), with_kwargs=True) for i in range(first, len(layers))]
        hooks.observers = [observe] if observers else []
        stored: list[_Stored] = []
        done_texts = done_tokens = 0
        try:
            for batch in batches(self.loaded.tokenizer, self.texts, seq_len=self.seq_len, batch_size=self.batch_size,
                                 device=self.loaded.device):
                parts = [batch]
                while parts:
                    part = parts.pop(0)
                    capture.update(kwargs={}, hidden={})
                    real["flat"] = part.attention_mask.reshape(-1).bool()
                    pending.clear()
                    try:
                        stored.append(self._base_forward(part, capture, bool(starts)))
                    except torch.OutOfMemoryError:
                        parts[:0] = self._halve_batch(part)
                        continue
                    for call in pending:
                        for observer in observers:
                            observer(*call)
                done_texts += batch.input_ids.shape[0]
                done_tokens += batch.tokens
                self.progress(ProgressEvent("base pass", done_texts, len(self.texts), done_tokens))
        finally:
            for handle in handles:
                handle.remove()
            hooks.observers = []
            pending.clear()
        self._tokens = sum(item.tokens for item in stored)
        return stored

    def _halve_batch(self, batch: Batch) -> list[Batch]:
        rows = batch.input_ids.shape[0]
        if rows == 1:
            raise torch.OutOfMemoryError(f"out of memory in the unmodified pass with one text of {self.seq_len} tokens")
        mid = rows // 2
        self._free(f"out of memory in the unmodified pass: now {rows - mid} texts per forward")
        halves = [slice(0, mid), slice(mid, rows)]
        return [Batch(batch.input_ids[h], batch.attention_mask[h], int(batch.attention_mask[h].sum())) for h in halves]

    def _base_forward(self, batch: Batch, capture: dict, targets: bool) -> _Stored:
        mask = batch.attention_mask.bool()
        out = self.decoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
        counts = mask.sum(dim=1).tolist()
        offsets = [0]
        for c in counts:
            offsets.append(offsets[-1] + int(c))
        k = self.top_tokens
        values = torch.empty(offsets[-1] if targets else 0, k, dtype=torch.float32, device=self.park)
        indices = torch.empty(values.shape, dtype=torch.int32, device=self.park)
        if targets:
            hidden = out.last_hidden_state[mask]  # [N, H], after the final norm
            step = self._token_chunk()
            for s in range(0, hidden.shape[0], step):
                v, i = top_targets(self.head(hidden[s : s + step]), k)
                values[s : s + step], indices[s : s + step] = v.to(self.park), i.to(self.park)
        return _Stored(mask, offsets, values, indices, capture["kwargs"], capture["hidden"])

    def _cached(self, starts: list[int]) -> list[int]:
        """Returns the layers whose input pass 1 stores (the first always; the rest as the cap allows)."""
        order = sorted(set(starts))
        width = self.loaded.model.get_input_embeddings().weight.shape[1]
        itemsize = self.loaded.model.get_input_embeddings().weight.element_size()
        per_layer = len(self.texts) * self.seq_len * width * itemsize
        keep = max(1, int(self.hidden_cache_mb * 2**20 // max(per_layer, 1)))
        if keep < len(order):
            self.notes.append(
                f"hidden states of {keep} of {len(order)} layers fit --hidden-cache-mb {self.hidden_cache_mb}; "
                "the others are recomputed from the last stored layer"
            )
        return order[:keep]

    def _advance(self, hooks: RoutingHooks, stored: list[_Stored], start: int) -> None:
        """Makes every batch hold the unmodified hidden state at `start`, dropping earlier ones."""
        for item in stored:
            if start not in item.hidden:
                source = max(i for i in item.hidden if i < start)
                h = item.hidden[source].to(self.loaded.device)
                hooks.overrides = {}
                for j in range(source, start):
                    h = _call(self.decoder.layers[j], h, item.kwargs[j])
                item.hidden[start] = h.to(self.park)
            item.hidden = {i: t for i, t in item.hidden.items() if i >= start}

    def _scan_layer(self, hooks: RoutingHooks, plan: LayerPlan, start: int, stored: list[_Stored]) -> torch.Tensor:
        n = len(plan.variants)
        sums = torch.zeros(n, dtype=torch.float64)
        total = n * sum(item.rows for item in stored)
        done = 0
        for item in stored:
            rows = self.row_limit or item.rows
            queue = [(v, min(v + self.stack, n), r, min(r + rows, item.rows))
                     for v in range(0, n, self.stack) for r in range(0, item.rows, rows)]
            while queue:
                v0, v1, r0, r1 = queue.pop(0)
                try:
                    part = self._chunk(hooks, plan, start, item, v0, v1, r0, r1)
                except torch.OutOfMemoryError:
                    queue[:0] = self._halve(v0, v1, r0, r1, start)
                    continue
                sums[v0:v1] += part
                done += (v1 - v0) * (r1 - r0)
                self.variant_tokens += (v1 - v0) * (item.offsets[r1] - item.offsets[r0])
                self.progress(ProgressEvent("candidates", done, total, self.variant_tokens, note=f"L{start}"))
        return sums / max(sum(item.tokens for item in stored), 1)

    def _halve(self, v0: int, v1: int, r0: int, r1: int, start: int) -> list[tuple[int, int, int, int]]:
        if v1 - v0 > 1:
            mid = (v0 + v1) // 2
            self.stack = max(1, (v1 - v0) // 2)
            self._free(f"out of memory at layer {start}: now {self.stack} variants per forward")
            return [(v0, mid, r0, r1), (mid, v1, r0, r1)]
        if r1 - r0 > 1:
            mid = (r0 + r1) // 2
            self.row_limit = max(1, (r1 - r0) // 2)
            self._free(f"out of memory at layer {start}: now 1 variant x {self.row_limit} texts per forward")
            return [(v0, v1, r0, mid), (v0, v1, mid, r1)]
        raise torch.OutOfMemoryError(f"out of memory at layer {start} with one text of {self.seq_len} tokens per forward")

    def _chunk(self, hooks: RoutingHooks, plan: LayerPlan, start: int, item: _Stored,
               v0: int, v1: int, r0: int, r1: int) -> torch.Tensor:
        """Returns the summed KL [v1 - v0] of variants v0..v1 on texts r0..r1 of one stored batch."""
        replicas = v1 - v0
        h = item.hidden[start][r0:r1].to(self.loaded.device)
        h = h.repeat(replicas, 1, 1) if replicas > 1 else h  # replica-major: rows of variant v are contiguous
        hooks.overrides = {plan.position: _per_replica(plan.variants[v0:v1])}
        try:
            for j in range(start, len(self.decoder.layers)):
                h = _call(self.decoder.layers[j], h, _select_rows(item.kwargs[j], item.rows, r0, r1, replicas))
        finally:
            hooks.overrides = {}
        h = self.norm(h)
        mask = item.mask[r0:r1].to(h.device)
        lo, hi = item.offsets[r0], item.offsets[r1]
        # Each replica is held against the same targets: p' once, never repeated per replica.
        log_p = target_log_probs(item.values[lo:hi].to(h.device))
        indices = item.indices[lo:hi].to(h.device)
        rows, step = r1 - r0, self._token_chunk()
        sums = torch.zeros(replicas, dtype=torch.float64, device=h.device)
        for v in range(replicas):
            real = h[v * rows : (v + 1) * rows][mask]  # [n, H]: this replica's real tokens
            for s in range(0, real.shape[0], step):
                sums[v] += topk_kl(log_p[s : s + step], indices[s : s + step], self.head(real[s : s + step])).sum()
        return sums.cpu()

    def _token_chunk(self) -> int:
        return max(1, LOGITS_BUDGET.get(self.loaded.device.type, LOGITS_BUDGET["cpu"]) // self.vocab)

    def _free(self, note: str) -> None:
        if note not in self.notes:
            self.notes.append(note)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _longest_first(tokenizer, texts: list[str], seq_len: int) -> list[str]:
    """Returns the texts ordered by token count (after truncation), longest first, ties in given order."""
    lengths = [min(len(ids), seq_len) for ids in tokenizer(texts, add_special_tokens=True)["input_ids"]]
    return [texts[i] for i in sorted(range(len(texts)), key=lambda i: -lengths[i])]


def _per_replica(variants: Sequence[RouteVariant]):
    """Returns a route override for stacked replicas: replica v's tokens are routed by variants[v]."""

    def override(position, logits, weights, indices):
        parts = logits.split(logits.shape[0] // len(variants))
        routed = [variant(part) for variant, part in zip(variants, parts)]
        return torch.cat([w for w, _ in routed]), torch.cat([i for _, i in routed])

    return override


def _select_rows(kwargs: dict[str, Any], rows: int, r0: int, r1: int, replicas: int) -> dict[str, Any]:
    """Returns a decoder layer's keyword arguments for texts r0..r1 repeated `replicas` times.

    Per-text tensors (the causal mask [B, 1, T, T]) have the batch as their first dimension; shared
    ones (rotary embeddings [1, T, d], position ids) have 1 and broadcast, and are left alone.
    """

    def pick(x: Any) -> Any:
        if isinstance(x, torch.Tensor) and x.dim() > 0 and rows > 1 and x.shape[0] == rows:
            x = x[r0:r1]
            return x.repeat(replicas, *[1] * (x.dim() - 1)) if replicas > 1 else x
        if isinstance(x, tuple):
            return tuple(pick(y) for y in x)
        return x

    return {key: pick(value) for key, value in kwargs.items()}


def _call(layer: torch.nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


@torch.inference_mode()
def naive_kl(
    loaded: LoadedModel,
    texts: Sequence[str],
    plans: Sequence[LayerPlan],
    *,
    seq_len: int,
    batch_size: int = 8,
    top_tokens: int = TOP_TOKENS,
) -> dict[int, torch.Tensor]:
    """Returns what `KLEngine.run` returns, by brute force: one full forward per variant and batch.

    The reference the engine is tested and benchmarked against; no stored states, no stacking.
    """
    model = loaded.model
    k = min(top_tokens, int(loaded.adapter.output_head(model)[1].weight.shape[0]))
    sums = {plan.position: torch.zeros(len(plan.variants), dtype=torch.float64) for plan in plans}
    tokens = 0
    with RoutingHooks(loaded.layers, loaded.routing.num_experts) as hooks:
        for batch in batches(loaded.tokenizer, list(texts), seq_len=seq_len, batch_size=batch_size, device=loaded.device):
            mask = batch.attention_mask.bool()
            inputs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
            values, indices = top_targets(model(**inputs).logits[mask], k)
            log_p = target_log_probs(values)
            for plan in plans:
                for v, variant in enumerate(plan.variants):
                    hooks.overrides = {plan.position: lambda position, logits, w, i, f=variant: f(logits)}
                    sums[plan.position][v] += topk_kl(log_p, indices, model(**inputs).logits[mask]).sum().cpu()
                    hooks.overrides = {}
            tokens += batch.tokens
    return {position: s / max(tokens, 1) for position, s in sums.items()}
