"""Train the default English→French model from scratch: corpus → tokenizer → Transformer.

    python -m export.training.train --out models/en-fr-small

Teacher forcing with label-smoothed cross-entropy; Adam (β2 = 0.98) with linear warm-up then
inverse-square-root decay; length-bucketed batches. Seeded: the same command on the same
machine (same thread count) gives the same weights.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from export.checkpoint import TOKENIZER_FILE, save_model
from export.corpus import CorpusConfig, generate_corpus, write_corpus
from export.data import Example, bucketed_batches, collate, encode_pairs
from export.model import Transformer, TransformerConfig
from export.training.tokenizer import train_tokenizer
from export.translate import translate_texts
from service.modeldir.tokenizer import Tokenizer

# The default model: small enough to train on 2 CPU cores in well under 45 minutes and to keep
# everything committed under models/ within budget (≈2.5 M parameters ≈ 10 MB in fp32).
DEFAULT_MODEL = TransformerConfig(
    vocab_size=2000,  # replaced by the trained tokenizer's size
    d_model=160,
    n_heads=4,
    n_encoder_layers=3,
    n_decoder_layers=3,
    d_ff=640,
    dropout=0.1,
    max_positions=128,
)


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 1234
    steps: int = 6000  # optimizer updates
    max_tokens: int = 4000  # padded source + target tokens per batch
    peak_lr: float = 1.2e-3
    warmup_steps: int = 800
    label_smoothing: float = 0.1
    clip_norm: float = 1.0
    vocab_size: int = 2000  # BPE vocabulary (specials included)
    threads: int = 2
    eval_every: int = 500  # steps between validation checks
    eval_sentences: int = 200  # valid sentences greedily decoded at each check


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to `peak_lr`, then decay ∝ 1/√step (the Transformer paper's schedule)."""
    step = max(step, 1)
    return cfg.peak_lr * min(step / cfg.warmup_steps, math.sqrt(cfg.warmup_steps / step))


def batch_loss(
    model: Transformer, examples: list[Example], label_smoothing: float
) -> tuple[torch.Tensor, int]:
    """Mean label-smoothed cross-entropy over the real target tokens, and their count."""
    pad_id = model.cfg.pad_id
    batch = collate(examples, pad_id)
    logits = model(batch.src, batch.tgt_in)  # (B, T, V)
    loss = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)),
        batch.tgt_out.reshape(-1),
        ignore_index=pad_id,
        label_smoothing=label_smoothing,
    )
    return loss, int((batch.tgt_out != pad_id).sum())


@torch.no_grad()
def validate(
    model: Transformer,
    tokenizer: Tokenizer,
    valid: list[tuple[str, str]],
    examples: list[Example],
    cfg: TrainConfig,
) -> dict[str, float]:
    """Validation loss (no smoothing) and greedy exact match on the first `eval_sentences`."""
    model.eval()
    total, tokens = 0.0, 0
    for start in range(0, len(examples), 128):
        loss, n = batch_loss(model, examples[start : start + 128], 0.0)
        total, tokens = total + float(loss) * n, tokens + n
    sample = valid[: cfg.eval_sentences]
    hyps = translate_texts(model, tokenizer, [en for en, _ in sample], beam_size=1)
    exact = sum(h == fr for h, (_, fr) in zip(hyps, sample, strict=True)) / len(sample)
    model.train()
    return {"valid_loss": total / tokens, "valid_exact_match": exact}


def train_model(
    model: Transformer,
    tokenizer: Tokenizer,
    train_examples: list[Example],
    valid_pairs: list[tuple[str, str]],
    cfg: TrainConfig,
    *,
    progress: bool = True,
) -> list[dict[str, float]]:
    """Train in place for `cfg.steps` updates; returns the validation log."""
    rng = random.Random(cfg.seed)
    valid_examples = encode_pairs(tokenizer, valid_pairs, model.cfg.max_positions)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.peak_lr, betas=(0.9, 0.98), eps=1e-9)
    model.train()
    log: list[dict[str, float]] = []
    batches: list[list[int]] = []
    bar = tqdm(total=cfg.steps, disable=not progress, unit="step", dynamic_ncols=True, mininterval=2.0)
    start, seen_tokens, smoothed = time.perf_counter(), 0, None
    for step in range(1, cfg.steps + 1):
        if not batches:  # a new epoch: fresh buckets in a fresh order
            batches = bucketed_batches(train_examples, cfg.max_tokens, rng)
        examples = [train_examples[i] for i in batches.pop()]
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, cfg)
        loss, n_tokens = batch_loss(model, examples, cfg.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_norm)
        optimizer.step()
        seen_tokens += n_tokens
        value = loss.item()
        smoothed = value if smoothed is None else 0.98 * smoothed + 0.02 * value
        elapsed = time.perf_counter() - start
        bar.set_postfix(loss=f"{smoothed:.3f}", tok_s=f"{seen_tokens / elapsed:.0f}", refresh=False)
        bar.update(1)
        if step % cfg.eval_every == 0 or step == cfg.steps:
            entry = {"step": step, "train_loss": smoothed, "elapsed_s": elapsed}
            entry.update(validate(model, tokenizer, valid_pairs, valid_examples, cfg))
            log.append(entry)
            bar.write(
                f"step {step}: train loss {smoothed:.3f}, valid loss {entry['valid_loss']:.3f}, "
                f"valid exact match {entry['valid_exact_match']:.1%}, {elapsed / 60:.1f} min"
            )
    bar.close()
    model.eval()
    return log


def main() -> None:
    parser = argparse.ArgumentParser(description="Train the default English→French Transformer.")
    parser.add_argument("--out", type=Path, required=True, help="model directory to write")
    parser.add_argument("--corpus-dir", type=Path, default=Path("data/corpus"))
    parser.add_argument("--steps", type=int, default=TrainConfig.steps)
    parser.add_argument("--seed", type=int, default=TrainConfig.seed)
    parser.add_argument("--threads", type=int, default=TrainConfig.threads)
    parser.add_argument("--train-size", type=int, default=CorpusConfig.train_size)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    args = parser.parse_args()
    cfg = replace(TrainConfig(), steps=args.steps, seed=args.seed, threads=args.threads)
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)

    t0 = time.perf_counter()
    splits = generate_corpus(CorpusConfig(seed=cfg.seed, train_size=args.train_size))
    write_corpus(splits, args.corpus_dir)
    train_pairs = [(p.en, p.fr) for p in splits["train"]]
    valid_pairs = [(p.en, p.fr) for p in splits["valid"]]
    hf_tokenizer = train_tokenizer(train_pairs, cfg.vocab_size)
    args.out.mkdir(parents=True, exist_ok=True)
    hf_tokenizer.save(str(args.out / TOKENIZER_FILE))
    tokenizer = Tokenizer.from_file(args.out / TOKENIZER_FILE)
    print(
        f"corpus {len(train_pairs)} train pairs, tokenizer {tokenizer.vocab_size} tokens "
        f"({time.perf_counter() - t0:.0f} s)"
    )

    sp = tokenizer.special
    model_cfg = replace(
        DEFAULT_MODEL,
        vocab_size=tokenizer.vocab_size,
        pad_id=sp.pad,
        bos_id=sp.bos,
        eos_id=sp.eos,
        unk_id=sp.unk,
    )
    model = Transformer(model_cfg)
    print(f"model: {model.num_parameters() / 1e6:.2f} M parameters")
    train_examples = encode_pairs(tokenizer, train_pairs, model_cfg.max_positions)
    log = train_model(model, tokenizer, train_examples, valid_pairs, cfg, progress=not args.no_progress)
    save_model(model, args.out)
    (args.out / "training.json").write_text(
        json.dumps({"train_config": asdict(cfg), "log": log, "total_s": time.perf_counter() - t0}, indent=2)
        + "\n"
    )
    print(f"saved {args.out} in {(time.perf_counter() - t0) / 60:.1f} min")


if __name__ == "__main__":
    main()
