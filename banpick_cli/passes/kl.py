"""The shared KL engine: the top-1000 KL of appendix B for many one-layer routing variants of a model.

A variant changes how one MoE layer l routes and nothing before it. The engine runs layer-major: per
window of calibration batches, each decoder layer is acquired once (moved to the device, or read from
the checkpoint when the model is streamed, passes/streaming.py) and everything that needs it goes
through it while it is resident: the unmodified model, and every variant whose layer is at or before
it, forked from the unmodified state at its own layer. The window's states stay beside each other (on
the device, then the CPU, then disk, within `hidden_cache_mb`). After the last layer the final norm
and LM head give the unmodified model's top-k logits (values and ids, never the full [tokens, vocab]
logits) and each variant's KL against them. The work is one forward for the unmodified model plus sum
over variants of (L - l)/L forwards, as in the earlier replay order (one sweep of layers l..end per
candidate layer), while the layer loads fall from one per candidate layer to one per window.

No layer's numbers are final before the last window, so a run is resumable by windows: after each
window `on_window` receives a `WindowSums` (the KL sums and token count so far), the stage saves it
with its observers' state, and a rerun passes it back as `resume` and starts at the next batch.

`naive_kl` is the slow reference, one full forward per variant and batch; tests hold the engine equal
to it to float32 rounding on every family (not bit for bit: the stacked forwards batch the GEMMs
differently).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from banpick_cli.passes.batches import Batch, batches
from banpick_cli.passes.sequential import _layer_inputs, _to
from banpick_cli.passes.streaming import LayerSource
from banpick_cli.models.base import ObserveFn, RoutingHooks
from banpick_cli.models.loading import LoadedModel
from banpick_cli.progress import ProgressEvent, ProgressFn, silent
from banpick_cli.passes.kl_math import TOP_TOKENS, LayerPlan, default_stack, RouteVariant, target_log_probs, top_targets, topk_kl
from banpick_cli.passes.kl_stack import per_replica, select_rows
from banpick_cli.passes.kl_windows import WindowStates, WindowSums, cut_windows, state_tiers

# LM-head outputs (floats) materialised at once: 8 MiB in float32 on a CPU (stays in cache), 512 MiB on a GPU.
LOGITS_BUDGET = {"cpu": 1 << 21, "cuda": 1 << 27}


@dataclass
class _Item:
    """One calibration batch of a window: its mask, target rows, the layers' call arguments, the base state."""

    mask: torch.Tensor  # bool [B, T]: real (non-padding) tokens
    offsets: list[int]  # row b's real tokens are rows offsets[b]:offsets[b+1] of the targets
    calls: list[tuple[tuple, dict[str, Any]]]  # per decoder layer: the (args, kwargs) the model passed it
    hidden: torch.Tensor  # [B, T, H]: the unmodified model's input to the next layer to run

    @property
    def rows(self) -> int:
        return self.mask.shape[0]

    @property
    def tokens(self) -> int:
        return self.offsets[-1]


@dataclass
class _Variant:
    plan: int  # index into the sorted plans
    start: int  # the decoder layer it routes differently
    position: int  # that layer's MoE position
    route: RouteVariant


class KLEngine:
    """Top-k KL of one-layer routing variants against the unmodified model, on one calibration set.

    Layer-major: the calibration batches are cut into windows whose hidden states fit `hidden_cache_mb`
    (one window unless the variants are many); per window every decoder layer is acquired once (moved
    to the device, or read from the checkpoint when the model is streamed) and everything that needs it
    runs through it while it is resident: the unmodified model (whose routing the observers see), and
    every variant whose layer is at or before it, starting from the unmodified state at its layer.
    The final norm and LM head come last. Layers before a variant's are never run for it, so the work
    is that of the replay order (one unmodified forward plus sum over variants of (L - l)/L forwards)
    while the layer loads fall from one per variant to one per window.

    `stack` variants of one plan share one forward (rows = stack x batch rows); 0 picks 8 on a GPU and
    2 on a CPU (docs/benchmarks.md). Variants of different plans are never stacked together, so a plan's
    numbers do not depend on which other plans run (a resumed scan gives the same bits). On an
    out-of-memory the engine halves the variants per forward, then the texts, and goes on; `notes` says
    so. Texts are batched longest first (`sort_by_length`), so the padding that every variant pays
    again stays small.
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
        window_batches: int = 0,
        sort_by_length: bool = True,
        progress: ProgressFn = silent,
    ):
        self.loaded = loaded
        # Batches of texts of similar length waste little on padding, and every variant pays for the
        # padding again; the mean over tokens does not depend on the order.
        self.texts = _longest_first(loaded.tokenizer, list(texts), seq_len) if sort_by_length else list(texts)
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.device = loaded.device
        self.stack = stack or default_stack(self.device.type)
        self.row_limit: int | None = None  # texts per forward, set only after an out-of-memory
        self.hidden_cache_mb = hidden_cache_mb
        self.window_batches = window_batches  # at most this many batches per window (0: what fits the budget)
        self.progress = progress
        self.notes: list[str] = []
        self.decoder = loaded.adapter.decoder(loaded.model)
        self.vocab = int(loaded.model.config.get_text_config().vocab_size)
        self.top_tokens = min(top_tokens, self.vocab)
        if top_tokens > self.vocab:
            self.notes.append(f"--top-tokens {top_tokens} is larger than the vocabulary ({self.vocab}); using {self.vocab}")
        self.park = torch.device("cpu") if self.device.type == "cuda" else self.device
        self._tokens: int | None = None
        self.variant_tokens = 0  # tokens run through modified layers so far (for tokens/s)
        self.layer_loads: list[int] = []  # per decoder layer, after `run`
        self.windows = 0  # windows the last `run` computed
        self.windows_resumed = 0  # windows it took over from `resume`

    @property
    def tokens(self) -> int:
        """Returns the number of real tokens in the calibration set (each KL is a mean over them)."""
        if self._tokens is None:
            self._tokens = sum(b.tokens for b in self._batches())
        return self._tokens

    def _batches(self) -> list[Batch]:
        return list(batches(self.loaded.tokenizer, self.texts, seq_len=self.seq_len, batch_size=self.batch_size,
                            device=torch.device("cpu")))

    # --- the scan --------------------------------------------------------------------------------
    @torch.inference_mode()
    def run(
        self,
        plans: Sequence[LayerPlan],
        *,
        observers: Sequence[ObserveFn] = (),
        on_layer: Callable[[int, torch.Tensor], None] | None = None,
        resume: WindowSums | None = None,
        on_window: Callable[[WindowSums], None] | None = None,
    ) -> dict[int, torch.Tensor]:
        """Returns position -> mean top-k KL of each variant [n] (float64) over every real token.

        `on_window(sums)` is called after each window (to checkpoint; observers' state is then as of the
        same batches), and a run given `resume` starts after its batches, from its sums: the same numbers
        as a run never interrupted. `on_layer(position, kl)` is called for each plan once its numbers are
        final, in position order. `observers` see the unmodified routing of every MoE layer, real tokens
        only.
        """
        plans = sorted(plans, key=lambda p: p.position)
        if not plans and not observers:
            return {}
        index = {layer.position: layer.layer_index for layer in self.loaded.layers}
        self.position_of = {layer.layer_index: layer.position for layer in self.loaded.layers}
        variants = [_Variant(p, index[plan.position], plan.position, route)
                    for p, plan in enumerate(plans) for route in plan.variants]
        # Observers need the decoder up to the last MoE layer; KL needs all of it and the head.
        last = len(self.decoder.layers) - 1 if plans else max(index.values())
        all_batches = self._batches()
        sums = torch.zeros(len(variants), dtype=torch.float64)
        done = WindowSums(0, 0, 0, sums)
        if resume is not None:
            if resume.kl_sums.shape != sums.shape or not 0 <= resume.batches <= len(all_batches):
                raise ValueError(f"resume state of {resume.kl_sums.numel()} variants and {resume.batches} batches "
                                 f"does not fit this run ({len(variants)} variants, {len(all_batches)} batches)")
            sums.copy_(resume.kl_sums)
            done = WindowSums(resume.batches, resume.windows, resume.tokens, sums)
        windows = self._windows(all_batches[done.batches:], len(variants))
        self.windows, self.windows_resumed = len(windows), done.windows
        total = done.windows + len(windows)
        source = LayerSource(self.loaded)
        rows_total = sum(b.input_ids.shape[0] for w in windows for b in w)
        self._work = [0, sum((last + 1 - v.start) for v in variants) * rows_total]  # candidates progress
        self._layer_steps = [0, len(windows) * (last + 1)]
        # The first event is the baseline: resumed windows are not work done at this run's rate.
        self.progress(ProgressEvent("windows", done.windows, total, note="resumed" if done.windows else ""))
        with RoutingHooks(self.loaded.layers, self.loaded.routing.num_experts) as hooks:
            for window in windows:
                tokens = self._window(hooks, source, window, variants, observers, sums, last)
                done = WindowSums(done.batches + len(window), done.windows + 1, done.tokens + tokens, sums)
                if on_window is not None:
                    on_window(WindowSums(done.batches, done.windows, done.tokens, sums.clone()))
                self.progress(ProgressEvent("windows", done.windows, total, self.variant_tokens,
                                            note=f"batch {done.batches}/{len(all_batches)}"))
        self._tokens = done.tokens
        self.layer_loads = source.loads
        results: dict[int, torch.Tensor] = {}
        first = 0
        for n, plan in enumerate(plans):
            count = len(plan.variants)
            results[plan.position] = kl = sums[first : first + count] / max(done.tokens, 1)
            first += count
            if on_layer is not None:
                on_layer(plan.position, kl)
            self.progress(ProgressEvent("layers", n + 1, len(plans), note=f"L{index[plan.position]}"))
        return results

    def _windows(self, all_batches: list[Batch], variants: int) -> list[list[Batch]]:
        """Returns the batches cut into windows whose states (the base's and every variant's) fit the budget,
        of at most `window_batches` batches each when set."""
        width = int(self.loaded.model.config.get_text_config().hidden_size)
        itemsize = torch.empty((), dtype=self._dtype()).element_size()
        budget = sum(b for _, b in self._tiers())
        windows = cut_windows(all_batches, width * itemsize * (variants + 1), budget, self.window_batches)
        if len(windows) > 1 and (not self.window_batches or len(windows) > -(-len(all_batches) // self.window_batches)):
            self.notes.append(f"the hidden states of {variants} variants fit --hidden-cache-mb {self.hidden_cache_mb} "
                              f"in {len(windows)} windows of batches: each decoder layer is loaded once per window")
        return windows

    def _tiers(self) -> list[tuple[torch.device, int]]:
        return state_tiers(self.device, self.hidden_cache_mb)

    def _dtype(self) -> torch.dtype:
        return self.loaded.model.get_input_embeddings().weight.dtype

    def _window(self, hooks: RoutingHooks, source: LayerSource, window: list[Batch], variants: list[_Variant],
                observers: Sequence[ObserveFn], sums: torch.Tensor, last: int) -> int:
        """Runs one window through every layer and the head, adding each variant's KL sum into `sums`."""
        items = []
        for batch in window:
            hidden, calls = _layer_inputs(self.decoder, batch, last, self.device)
            mask = batch.attention_mask.bool()
            offsets = [0]
            for c in mask.sum(dim=1).tolist():
                offsets.append(offsets[-1] + int(c))
            items.append(_Item(mask, offsets, calls, hidden.to(self.park)))
        states = WindowStates(self._tiers())
        try:
            for j in range(last + 1):
                layer = source.acquire(j, self.device)
                try:
                    for b, item in enumerate(items):
                        self._variants_through(hooks, layer, j, b, item, variants, states)
                        item.hidden = self._base_through(hooks, layer, j, item, observers)
                finally:
                    source.release(j)
                self._layer_steps[0] += 1
                self.progress(ProgressEvent("decoder layers", *self._layer_steps, self.variant_tokens,
                                            note=f"layer {j + 1}/{last + 1}"))
            if variants:
                with source.head(self.device) as (norm, head):
                    for b, item in enumerate(items):
                        self._kl(norm, head, b, item, variants, states, sums)
            if states.spilled and not any("disk" in note for note in self.notes):
                self.notes.append(f"variant hidden states beyond --hidden-cache-mb {self.hidden_cache_mb} were kept on disk")
        finally:
            states.close()
        return sum(item.tokens for item in items)

    def _base_through(self, hooks: RoutingHooks, layer: torch.nn.Module, j: int, item: _Item,
                      observers: Sequence[ObserveFn]) -> torch.Tensor:
        """Returns the unmodified state after layer j; observers see its routing (real tokens only)."""
        pending: list[tuple] = []
        real: dict[str, torch.Tensor] = {}

        def observe(position, logits, weights, indices):
            m = real["flat"].to(logits.device)
            pending.append((position, logits[m], weights[m], indices[m]))

        hooks.overrides = {}
        hooks.observers = [observe] if observers and j in self.position_of else []
        parts: list[torch.Tensor] = []
        rows = self.row_limit or item.rows
        queue = [(r, min(r + rows, item.rows)) for r in range(0, item.rows, rows)]
        try:
            while queue:
                r0, r1 = queue.pop(0)
                real["flat"] = item.mask[r0:r1].reshape(-1)
                pending.clear()
                try:
                    out = self._call(layer, item, j, item.hidden[r0:r1], r0, r1, 1)
                except torch.OutOfMemoryError:
                    if r1 - r0 == 1:
                        raise torch.OutOfMemoryError(
                            f"out of memory in the unmodified pass with one text of {self.seq_len} tokens") from None
                    mid = (r0 + r1) // 2
                    self.row_limit = max(1, mid - r0)
                    self._free(f"out of memory in the unmodified pass: now {self.row_limit} texts per forward")
                    queue[:0] = [(r0, mid), (mid, r1)]
                    continue
                # Observer calls wait until their rows succeed: an out-of-memory retry never shows the same tokens twice.
                for call in pending:
                    for observer in observers:
                        observer(*call)
                parts.append(out.to(self.park))
        finally:
            hooks.observers = []
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _variants_through(self, hooks: RoutingHooks, layer: torch.nn.Module, j: int, b: int, item: _Item,
                          variants: list[_Variant], states: WindowStates) -> None:
        """Advances every variant that routes at or before layer j through it, for one batch."""
        chunks: list[list[int]] = []  # at most `stack` variants, all of one plan
        for k, variant in enumerate(variants):
            if variant.start > j:
                continue
            if chunks and variants[chunks[-1][-1]].plan == variant.plan and len(chunks[-1]) < self.stack:
                chunks[-1].append(k)
            else:
                chunks.append([k])
        for chunk in chunks:
            starting = variants[chunk[0]].start == j  # a plan's variants all start at its layer
            inputs = {k: item.hidden if starting else states.pop((k, b)) for k in chunk}
            parts: dict[int, list[torch.Tensor]] = {k: [] for k in chunk}
            rows = self.row_limit or item.rows
            queue = [(chunk, r0, min(r0 + rows, item.rows)) for r0 in range(0, item.rows, rows)]
            while queue:
                sub, r0, r1 = queue.pop(0)
                h = torch.cat([inputs[k][r0:r1].to(self.device) for k in sub])
                hooks.overrides = {variants[sub[0]].position: per_replica([variants[k].route for k in sub])} if starting else {}
                try:
                    out = self._call(layer, item, j, h, r0, r1, len(sub))
                except torch.OutOfMemoryError:
                    queue[:0] = self._halve(sub, r0, r1, j)
                    continue
                finally:
                    hooks.overrides = {}
                n = r1 - r0
                for i, k in enumerate(sub):  # replica-major: rows of variant i are contiguous
                    parts[k].append(out[i * n : (i + 1) * n])
                self.variant_tokens += len(sub) * (item.offsets[r1] - item.offsets[r0])
                self._work[0] += len(sub) * n
                self.progress(ProgressEvent("candidates", *self._work, self.variant_tokens, note=f"L{variants[sub[0]].start}"))
            for k in chunk:
                found = parts[k]
                states.put((k, b), found[0] if len(found) == 1 else torch.cat(found))

    def _halve(self, chunk: list[int], r0: int, r1: int, j: int) -> list[tuple[list[int], int, int]]:
        if len(chunk) > 1:
            mid = len(chunk) // 2
            self.stack = max(1, mid)
            self._free(f"out of memory at layer {j}: now {self.stack} variants per forward")
            return [(chunk[:mid], r0, r1), (chunk[mid:], r0, r1)]
        if r1 - r0 > 1:
            mid = (r0 + r1) // 2
            self.row_limit = max(1, mid - r0)
            self._free(f"out of memory at layer {j}: now 1 variant x {self.row_limit} texts per forward")
            return [(chunk, r0, mid), (chunk, mid, r1)]
        raise torch.OutOfMemoryError(f"out of memory at layer {j} with one text of {self.seq_len} tokens per forward")

    def _call(self, layer: torch.nn.Module, item: _Item, j: int, h: torch.Tensor, r0: int, r1: int,
              replicas: int) -> torch.Tensor:
        """Returns layer j's output for texts r0..r1 of a batch, `replicas` stacked copies (replica-major)."""
        args, kwargs = item.calls[j]
        args = select_rows(dict(enumerate(args)), item.rows, r0, r1, replicas)
        kwargs = select_rows(kwargs, item.rows, r0, r1, replicas)
        out = layer(h.to(self.device), *_to(tuple(args.values()), self.device), **_to(kwargs, self.device))
        return out[0] if isinstance(out, tuple) else out

    def _kl(self, norm: torch.nn.Module, head: torch.nn.Module, b: int, item: _Item, variants: list[_Variant],
            states: WindowStates, sums: torch.Tensor) -> None:
        """Adds each variant's summed top-k KL on one batch into `sums`, against the unmodified targets."""
        mask = item.mask.to(self.device)
        step = self._token_chunk()
        base = norm(item.hidden.to(self.device))[mask]  # [N, H]
        targets = [top_targets(head(base[s : s + step]), self.top_tokens) for s in range(0, base.shape[0], step)]
        # p' once per batch, held against every variant.
        log_p = [(target_log_probs(v), i) for v, i in targets]
        for k in range(len(variants)):
            real = norm(states.pop((k, b)).to(self.device))[mask]
            total = torch.zeros((), dtype=torch.float64, device=self.device)
            for n, s in enumerate(range(0, real.shape[0], step)):
                lp, idx = log_p[n]
                total += topk_kl(lp, idx, head(real[s : s + step])).sum()
            sums[k] += total.cpu()

    def _token_chunk(self) -> int:
        return max(1, LOGITS_BUDGET.get(self.device.type, LOGITS_BUDGET["cpu"]) // self.vocab)

    def _free(self, note: str) -> None:
        if note not in self.notes:
            self.notes.append(note)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _longest_first(tokenizer, texts: list[str], seq_len: int) -> list[str]:
    """Returns the texts ordered by token count (after truncation), longest first, ties in given order."""
    lengths = [min(len(ids), seq_len) for ids in tokenizer(texts, add_special_tokens=True)["input_ids"]]
    return [texts[i] for i in sorted(range(len(texts)), key=lambda i: -lengths[i])]
