"""Reference generation in PyTorch: greedy and beam search by full recomputation (no KV cache).

This is deliberately the slow, obviously-correct way — the decoder is re-run over the whole
prefix at every step — so that cached implementations (the ONNX graphs, the server) can be
checked token for token against it.

Scores are sums of token log-probabilities; beam search ranks finished hypotheses by
score / length**length_penalty, where length counts generated tokens including the end token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from export.model import Transformer, padding_mask


@dataclass(frozen=True)
class Hypothesis:
    tokens: list[int]  # generated ids, without the start token and without the end token
    score: float  # sum of log-probabilities, end token included when it was produced
    finished: bool  # True when the end token was produced, False when the length limit stopped it


def _next_log_probs(model: Transformer, memory: Tensor, src_mask: Tensor, prefix: Tensor) -> Tensor:
    """Log-probabilities of the token after `prefix` (B, T) → (B, V), recomputing the whole prefix."""
    hidden = model.decode(memory, src_mask, prefix, model.target_mask(prefix))
    log_probs = F.log_softmax(model.logits(hidden[:, -1]), dim=-1)
    # Padding and the start token are never outputs: a generated pad would be masked out of the
    # prefix that follows it. They keep their place in the softmax; they are just never chosen.
    log_probs[:, [model.cfg.pad_id, model.cfg.bos_id]] = float("-inf")
    return log_probs


def row_limits(max_output_tokens: int | Sequence[int], batch: int) -> list[int]:
    """One output-token limit per sentence (an int applies to all)."""
    if isinstance(max_output_tokens, int):
        return [max_output_tokens] * batch
    limits = [int(n) for n in max_output_tokens]
    if len(limits) != batch:
        raise ValueError(f"{len(limits)} output limits for a batch of {batch} sentences")
    return limits


def _top(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k best entries of each row, best first. Greedy and beam search share it so that
    ties break the same way and beam 1 is exactly greedy."""
    return torch.topk(scores, k, dim=-1, largest=True, sorted=True)


@torch.no_grad()
def greedy_decode(
    model: Transformer, src: Tensor, max_output_tokens: int | Sequence[int]
) -> list[Hypothesis]:
    """Greedy decoding of a padded batch of source ids (B, S); one hypothesis per row.

    `max_output_tokens`: one limit for all rows or one per row (end token included).
    """
    cfg = model.cfg
    src_mask = padding_mask(src, cfg.pad_id)
    memory = model.encode(src, src_mask)
    batch = src.size(0)
    limits = row_limits(max_output_tokens, batch)
    limit = torch.tensor(limits, device=src.device)
    prefix = torch.full((batch, 1), cfg.bos_id, dtype=torch.long, device=src.device)
    scores = torch.zeros(batch, device=src.device)
    done = limit <= 0
    for step in range(1, max(limits, default=0) + 1):
        if bool(done.all()):
            break
        log_probs = _next_log_probs(model, memory, src_mask, prefix)
        best_score, best = _top(log_probs, 1)
        token = torch.where(done, cfg.pad_id, best[:, 0])
        scores = scores + torch.where(done, 0.0, best_score[:, 0])
        prefix = torch.cat([prefix, token[:, None]], dim=1)
        done = done | (token == cfg.eos_id) | (limit <= step)
    out = []
    for row in range(batch):
        tokens = prefix[row, 1 : 1 + max(limits[row], 0)].tolist()
        finished = cfg.eos_id in tokens
        if finished:
            tokens = tokens[: tokens.index(cfg.eos_id)]
        out.append(Hypothesis(tokens, float(scores[row]), finished))
    return out


def normalized_score(score: float, length: int, length_penalty: float) -> float:
    return score / (max(length, 1) ** length_penalty)


@torch.no_grad()
def beam_search(
    model: Transformer,
    src: Tensor,
    max_output_tokens: int | Sequence[int],
    *,
    beam_size: int = 4,
    length_penalty: float = 1.0,
    n_best: int = 1,
) -> list[list[Hypothesis]]:
    """Beam search over a padded batch of source ids (B, S).

    Each step takes the 2K best continuations of a sentence's K live beams; continuations that
    end in the end token are finished when they rank among the first K, the rest refill the
    beam. A sentence stops when K hypotheses have finished and the best live beam, normalized at
    the current length, does not beat the K-th best of them (so beam 1 is greedy); live beams
    still running at the sentence's length limit (one for all or one per sentence) become
    unfinished hypotheses.

    Returns: per sentence, the `n_best` hypotheses ranked by normalized score, best first.
    """
    cfg = model.cfg
    if not 1 <= n_best <= beam_size:
        raise ValueError(f"n_best {n_best} must be between 1 and beam_size {beam_size}")
    batch, k = src.size(0), beam_size
    src_mask = padding_mask(src, cfg.pad_id)
    memory = model.encode(src, src_mask)
    memory = memory.repeat_interleave(k, dim=0)  # (B*K, S, D)
    src_mask = src_mask.repeat_interleave(k, dim=0)
    prefix = torch.full((batch * k, 1), cfg.bos_id, dtype=torch.long, device=src.device)
    # Only beam 0 is live at the start, so the first step does not pick K copies of one token.
    beam_scores = torch.full((batch, k), float("-inf"), device=src.device)
    beam_scores[:, 0] = 0.0
    limits = row_limits(max_output_tokens, batch)
    finished: list[list[tuple[float, Hypothesis]]] = [[] for _ in range(batch)]
    for b in range(batch):
        if limits[b] <= 0:
            finished[b].append((0.0, Hypothesis([], 0.0, False)))
    active = [limit > 0 for limit in limits]
    vocab = cfg.vocab_size
    for step in range(1, max(limits, default=0) + 1):
        if not any(active):
            break
        log_probs = _next_log_probs(model, memory, src_mask, prefix).view(batch, k, vocab)
        candidates = (beam_scores[:, :, None] + log_probs).view(batch, k * vocab)
        cand_scores, cand_ids = _top(candidates, 2 * k)  # (B, 2K)
        next_rows: list[int] = []
        next_tokens: list[int] = []
        next_scores: list[float] = []
        for b in range(batch):
            first = len(next_rows)  # this sentence's kept beams start here
            for rank in range(2 * k if active[b] else 0):
                score = float(cand_scores[b, rank])
                beam, token = divmod(int(cand_ids[b, rank]), vocab)
                row = b * k + beam
                if score == float("-inf"):
                    break
                if token == cfg.eos_id:
                    if rank < k:
                        hyp = Hypothesis(prefix[row, 1:].tolist(), score, True)
                        finished[b].append((normalized_score(score, step, length_penalty), hyp))
                    continue
                next_rows.append(row)
                next_tokens.append(token)
                next_scores.append(score)
                if len(next_rows) - first == k:
                    break
            live = next_scores[first:]
            if active[b] and len(finished[b]) >= k:
                # Stop once no live beam can still beat the K-th best finished hypothesis. Exact for
                # length_penalty 0 (scores only fall); with a penalty it judges at the current length.
                kth_best = sorted((s for s, _ in finished[b]), reverse=True)[k - 1]
                if not live or normalized_score(max(live), step, length_penalty) <= kth_best:
                    active[b] = False
            if active[b] and step >= limits[b]:
                # Length limit: the live beams become unfinished hypotheses.
                for row, token, score in zip(next_rows[first:], next_tokens[first:], live, strict=True):
                    hyp = Hypothesis([*prefix[row, 1:].tolist(), token], score, False)
                    finished[b].append((normalized_score(score, step, length_penalty), hyp))
                active[b] = False
            # Inactive sentences keep K placeholder rows so that the batch shape stays (B*K).
            while len(next_rows) < (b + 1) * k:
                next_rows.append(b * k)
                next_tokens.append(cfg.pad_id)
                next_scores.append(float("-inf"))
        rows = torch.tensor(next_rows, device=src.device)
        prefix = torch.cat([prefix[rows], torch.tensor(next_tokens, device=src.device)[:, None]], dim=1)
        beam_scores = torch.tensor(next_scores, device=src.device).view(batch, k)
        for b in range(batch):
            if not active[b]:
                beam_scores[b] = float("-inf")
    results = []
    for b in range(batch):
        ranked = sorted(finished[b], key=lambda item: item[0], reverse=True)
        results.append([hyp for _, hyp in ranked[:n_best]])
    return results
