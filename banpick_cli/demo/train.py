"""Trains the shipped demo model: a small Qwen3-MoE on the three demo domains, from seeds alone."""

from __future__ import annotations

import itertools
import math
import random
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from banpick_cli.demo.corpus import DEFAULT_SEED, DOMAINS, build_demo_corpus, training_documents
from banpick_cli.errors import BadSetting
from banpick_cli.progress import ProgressEvent, ProgressFn, silent


@dataclass(frozen=True)
class TrainConfig:
    """Settings of one demo-model training run (recorded in the model card and `train_report.json`)."""

    data_seed: int = DEFAULT_SEED
    train_seed: int = 0
    # architecture (Qwen3-MoE: softmax router, top-k renormalised)
    num_layers: int = 4
    hidden_size: int = 128
    num_heads: int = 4
    num_kv_heads: int = 2
    num_experts: int = 32
    top_k: int = 8
    expert_size: int = 64
    vocab_size: int = 3000  # upper bound; BPE stops earlier when the corpus has fewer distinct words
    router_aux_loss_coef: float = 0.01
    # optimisation
    steps: int = 1200
    seq_len: int = 128
    batch_size: int = 30  # sequences per step, split evenly over the domains
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.01
    task_fraction: float = 0.5  # share of training documents that are task-formatted examples
    tokenizer_docs: int = 4000  # training documents per domain the tokenizer learns from
    # One thread: on a shared 2-core machine two OpenMP threads spin against other processes and ran
    # 2.5-7x slower per step than one; on an idle machine two are about twice as fast (then pass 2).
    threads: int = 1
    log_every: int = 25

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, (int, float)) and value < 0:
                raise BadSetting(f"train config: {f.name} must be >= 0, got {value}")
        for name in ("steps", "seq_len", "batch_size", "log_every", "threads", "num_layers", "num_heads",
                     "num_kv_heads", "num_experts", "top_k"):
            if getattr(self, name) < 1:
                raise BadSetting(f"train config: {name} must be >= 1, got {getattr(self, name)}")
        if self.top_k > self.num_experts:
            raise BadSetting(f"train config: top_k ({self.top_k}) exceeds num_experts ({self.num_experts})")
        if self.batch_size % len(DOMAINS):
            raise BadSetting(f"train config: batch_size must be a multiple of {len(DOMAINS)} (one share per domain)")
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise BadSetting("train config: hidden_size must divide by num_heads, num_heads by num_kv_heads")
        if not 0.0 <= self.task_fraction <= 1.0:
            raise BadSetting(f"train config: task_fraction must be in [0, 1], got {self.task_fraction}")


@dataclass(frozen=True)
class TrainReport:
    """What a training run produced: sizes, time, and losses."""

    out_dir: str
    config: dict
    parameters: int
    vocab_size: int
    checkpoint_bytes: int
    steps: int
    tokens: int
    wall_s: float
    final_train_loss: float  # language-model loss, mean of the last `log_every` steps
    final_aux_loss: float
    eval_loss: dict[str, float] = field(default_factory=dict)  # per domain, on its shipped calibration text
    loss_curve: list[tuple[int, float]] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)  # torch, transformers, tokenizers


def model_config(config: TrainConfig, tokenizer):
    """Returns the `Qwen3MoeConfig` of the demo model for a tokenizer."""
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        vocab_size=len(tokenizer), hidden_size=config.hidden_size, intermediate_size=4 * config.hidden_size,
        moe_intermediate_size=config.expert_size, num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads, num_key_value_heads=config.num_kv_heads,
        head_dim=config.hidden_size // config.num_heads, num_experts=config.num_experts,
        num_experts_per_tok=config.top_k, norm_topk_prob=True, decoder_sparse_step=1,
        router_aux_loss_coef=config.router_aux_loss_coef, output_router_logits=False,
        max_position_embeddings=512, tie_word_embeddings=True, use_cache=True,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
    )


class _Packer:
    """Fills fixed-length rows from one domain's document stream; every row starts at a document."""

    def __init__(self, docs, tokenizer, seq_len: int):
        self.docs, self.tok, self.seq_len = docs, tokenizer, seq_len
        self.eos = tokenizer.eos_token_id

    def row(self) -> list[int]:
        ids: list[int] = []
        while len(ids) < self.seq_len:
            segments = next(self.docs)
            for segment in segments:
                ids.extend(self.tok(segment, add_special_tokens=False).input_ids)
            ids.append(self.eos)
        return ids[: self.seq_len]


def _lr_at(step: int, config: TrainConfig) -> float:
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    floor = config.min_lr_ratio
    return config.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def domain_eval_loss(model, tokenizer, texts, *, seq_len: int = 128, batch_size: int = 32) -> float:
    """Returns the mean next-token loss (nats) over the tokens of `texts`, each truncated to `seq_len`."""
    import torch

    total, count = 0.0, 0
    side = tokenizer.padding_side
    tokenizer.padding_side = "right"
    try:
        for start in range(0, len(texts), batch_size):
            enc = tokenizer(list(texts[start:start + batch_size]), return_tensors="pt", padding=True,
                            truncation=True, max_length=seq_len)
            labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
            with torch.no_grad():
                logits = model(**enc).logits
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), reduction="sum")
            total += loss.item()
            count += int((labels[:, 1:] != -100).sum())
    finally:
        tokenizer.padding_side = side
    return total / max(1, count)


def train_demo_model(config: TrainConfig, out_dir: str | Path, progress: ProgressFn = silent) -> TrainReport:
    """Trains the demo model from seeds and saves model, tokenizer and generation config to `out_dir`."""
    import torch
    from transformers import GenerationConfig, Qwen3MoeForCausalLM

    from banpick_cli.demo.tokenizer import train_tokenizer

    torch.set_num_threads(config.threads)
    torch.manual_seed(config.train_seed)
    started = time.perf_counter()
    corpus = build_demo_corpus(config.data_seed)

    streams = {d: training_documents(corpus, d, config.train_seed, config.task_fraction) for d in DOMAINS}
    tokenizer_texts = [t for d in DOMAINS for t in corpus.calib[d]]
    for d in DOMAINS:
        # a separate stream so that the tokenizer's sample does not shift what the model trains on
        sample = training_documents(corpus, d, config.train_seed + 10_000, config.task_fraction)
        tokenizer_texts += ["".join(segments) for segments in itertools.islice(sample, config.tokenizer_docs)]
    tokenizer = train_tokenizer(tokenizer_texts, config.vocab_size)
    progress(ProgressEvent("tokenizer", 1, 1, note=f"vocab={len(tokenizer)}"))

    model = Qwen3MoeForCausalLM(model_config(config, tokenizer))
    model.train()
    decay = [p for p in model.parameters() if p.ndim >= 2]  # matrices; norms go without weight decay
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=config.lr, betas=(0.9, 0.95))
    packers = {d: _Packer(streams[d], tokenizer, config.seq_len) for d in DOMAINS}
    per_domain = config.batch_size // len(DOMAINS)
    shuffle = random.Random(config.train_seed)

    curve: list[tuple[int, float]] = []
    window: list[tuple[float, float]] = []
    tokens = 0
    for step in range(config.steps):
        rows = [packers[d].row() for d in DOMAINS for _ in range(per_domain)]
        shuffle.shuffle(rows)
        batch = torch.tensor(rows)  # [batch, seq_len]
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, config)
        out = model(input_ids=batch, labels=batch, output_router_logits=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += batch.numel()
        aux = out.aux_loss.item()
        window.append((out.loss.item() - config.router_aux_loss_coef * aux, aux))
        if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
            lm = sum(w[0] for w in window) / len(window)
            curve.append((step + 1, round(lm, 4)))
            progress(ProgressEvent("train", step + 1, config.steps, tokens=tokens,
                                   note=f"loss={lm:.3f} aux={sum(w[1] for w in window) / len(window):.3f}"))
            final = (lm, sum(w[1] for w in window) / len(window))
            window = []

    model.eval()
    eval_loss = {d: round(domain_eval_loss(model, tokenizer, corpus.calib[d], seq_len=config.seq_len), 4)
                 for d in DOMAINS}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(
        do_sample=False, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        max_new_tokens=64)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return TrainReport(
        out_dir=str(out_dir), config=asdict(config), parameters=sum(p.numel() for p in model.parameters()),
        vocab_size=len(tokenizer), checkpoint_bytes=sum(p.stat().st_size for p in out_dir.glob("*.safetensors")),
        steps=config.steps, tokens=tokens, wall_s=round(time.perf_counter() - started, 1),
        final_train_loss=round(final[0], 4), final_aux_loss=round(final[1], 4), eval_loss=eval_loss,
        loss_curve=curve, versions=_versions(),
    )


def _versions() -> dict[str, str]:
    import tokenizers
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "tokenizers": tokenizers.__version__}
