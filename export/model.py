"""The encoder–decoder Transformer ("Attention Is All You Need"), written plainly in PyTorch.

Built bottom-up: positions → attention → feed-forward → encoder/decoder layers → model.
Shapes in comments use B (batch), S (source length), T (target length), H (heads),
D (d_model), Dh (d_k = D / H), V (vocabulary).

Masks are boolean and True where attention is *allowed*; they broadcast to (B, H, Tq, Tk).

`encode` and `decode` are separate methods (as in the Annotated Transformer) because the
export turns them into separate graphs: an encoder graph run once per request and a
decoder-step graph run once per output token with a KV cache (`DecoderLayer.step`). The
attention helpers (`MultiHeadAttention.project_kv`, `scaled_dot_product_attention`,
`cached_attention`) are public for the same reason. The configuration, `TransformerConfig`, is
plain data in export.model_config (no torch), imported here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from export.model_config import Activation, NormPlacement, PositionLayout, TransformerConfig


def sinusoidal_positions(
    max_positions: int, d_model: int, layout: PositionLayout = "interleaved", offset: int = 0
) -> Tensor:
    """Row p: the encoding of position p + offset.  (P, D)

    interleaved: PE(pos, 2i) = sin(pos / 10000^(2i/D)), PE(pos, 2i+1) = cos(pos / 10000^(2i/D));
    marian: the same sines in dimensions [0, D/2) and cosines in [D/2, D);
    fairseq: halves as marian, angles pos · exp(-i · ln(10000) / (D/2 - 1)).
    """
    position = torch.arange(offset, offset + max_positions, dtype=torch.float32)[:, None]  # (P, 1)
    if layout == "fairseq":
        half = d_model // 2
        rate = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000.0) / (half - 1)))
        angle = position * rate  # (P, D/2)
        return torch.cat([torch.sin(angle), torch.cos(angle)], dim=1)
    if layout == "marian":  # in float64 and then rounded, as Marian computes it
        two_i = torch.arange(0, d_model, 2, dtype=torch.float64)
        angle = position.double() / torch.pow(10000.0, two_i / d_model)
        sentinel = (d_model + 1) // 2
        return torch.cat([torch.sin(angle), torch.cos(angle[:, : d_model - sentinel])], dim=1).float()
    two_i = torch.arange(0, d_model, 2, dtype=torch.float32)  # (D/2,)
    angle = position / torch.pow(10000.0, two_i / d_model)  # (P, D/2)
    pe = torch.zeros(max_positions, d_model)
    pe[:, 0::2] = torch.sin(angle)
    pe[:, 1::2] = torch.cos(angle[:, : d_model // 2])
    return pe


def scaled_dot_product_attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None
) -> tuple[Tensor, Tensor]:
    """softmax(QKᵀ / √d_k) · V.

    Args:
        q: (B, H, Tq, Dh); k, v: (B, H, Tk, Dh); mask: bool, broadcastable to (B, H, Tq, Tk).
    Returns:
        (output (B, H, Tq, Dh), attention probabilities (B, H, Tq, Tk)).
    """
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))  # (B, H, Tq, Tk)
    if mask is not None:
        # The dtype's minimum rather than -inf: a fully masked row then stays finite.
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    probs = scores.softmax(dim=-1)
    return probs @ v, probs


def cached_attention(
    q: Tensor, past_k: Tensor, past_v: Tensor, past_mask: Tensor, k_new: Tensor, v_new: Tensor
) -> Tensor:
    """One new query attending over a KV cache and over its own key/value: the same result as
    `scaled_dot_product_attention` over the cache with the new K/V appended as a last, always
    allowed slot, without building that concatenation.

    Concatenating would copy the whole cache at every decoding step (and in an exported graph
    make the caller copy it again); here only the (B, H, 1, T + 1) scores are concatenated, so
    the caller can keep the cache in a buffer of its own and write the new K/V into it.

    Args:
        q, k_new, v_new: (B, H, 1, Dh) the new token's query, key and value.
        past_k, past_v: (B, H, T, Dh) the cache; T may be 0.
        past_mask: bool, broadcastable to (B, H, 1, T): True at the real cache slots, in any
            pattern. The new token is always attended, so no row is ever fully masked.
    Returns:
        (B, H, 1, Dh)
    """
    scale = math.sqrt(q.size(-1))
    past_scores = q @ past_k.transpose(-2, -1) / scale  # (B, H, 1, T)
    past_scores = past_scores.masked_fill(~past_mask, torch.finfo(past_scores.dtype).min)
    new_score = (q * k_new).sum(dim=-1, keepdim=True) / scale  # (B, H, 1, 1)
    probs = torch.cat([past_scores, new_score], dim=-1).softmax(dim=-1)  # (B, H, 1, T + 1)
    # Slices relative to the end rather than at T: no size of the cache enters the traced graph.
    return probs[..., :-1] @ past_v + probs[..., -1:] * v_new


class MultiHeadAttention(nn.Module):
    """MultiHead(Q, K, V) = Concat(head_1..head_h) W^O, head_i = Attention(Q W_i^Q, K W_i^K, V W_i^V)."""

    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.d_k = d_model // n_heads
        self.w_q = nn.Linear(d_model, d_model)
        self.w_k = nn.Linear(d_model, d_model)
        self.w_v = nn.Linear(d_model, d_model)
        self.w_o = nn.Linear(d_model, d_model)
        self.dropout = nn.Dropout(dropout)

    def split_heads(self, x: Tensor) -> Tensor:
        """(B, T, D) → (B, H, T, Dh)"""
        b, t, _ = x.shape
        return x.view(b, t, self.n_heads, self.d_k).transpose(1, 2)

    def merge_heads(self, x: Tensor) -> Tensor:
        """(B, H, T, Dh) → (B, T, D)"""
        b, _, t, _ = x.shape
        return x.transpose(1, 2).reshape(b, t, self.n_heads * self.d_k)

    def project_q(self, x: Tensor) -> Tensor:
        return self.split_heads(self.w_q(x))

    def project_kv(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """K = X W^K, V = X W^V, split into heads: two (B, H, T, Dh). What a KV cache stores."""
        return self.split_heads(self.w_k(x)), self.split_heads(self.w_v(x))

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """Attention over already projected heads, then the output projection. → ((B, Tq, D), probs)"""
        out, probs = scaled_dot_product_attention(q, k, v, mask)
        # Dropout on the output, not on the probabilities: the returned probabilities stay exact.
        return self.dropout(self.w_o(self.merge_heads(out))), probs

    def attend_cached(
        self, q: Tensor, past_k: Tensor, past_v: Tensor, past_mask: Tensor, k_new: Tensor, v_new: Tensor
    ) -> Tensor:
        """`attend` for one new token over a cache plus its own K/V (`cached_attention`). → (B, 1, D)"""
        out = cached_attention(q, past_k, past_v, past_mask, k_new, v_new)
        return self.dropout(self.w_o(self.merge_heads(out)))

    def forward(self, query: Tensor, key_value: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        k, v = self.project_kv(key_value)
        return self.attend(self.project_q(query), k, v, mask)


class FeedForward(nn.Module):
    """FFN(x) = act(x W_1 + b_1) W_2 + b_2, applied at every position independently."""

    def __init__(self, d_model: int, d_ff: int, activation: Activation, dropout: float) -> None:
        super().__init__()
        self.w_1 = nn.Linear(d_model, d_ff)
        self.w_2 = nn.Linear(d_ff, d_model)
        self.act: nn.Module = {"relu": nn.ReLU(), "gelu": nn.GELU(), "swish": nn.SiLU()}[activation]
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.w_2(self.dropout(self.act(self.w_1(x)))))


class Sublayer(nn.Module):
    """Residual connection + LayerNorm around a sublayer, post-norm or pre-norm."""

    def __init__(self, d_model: int, placement: NormPlacement, eps: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d_model, eps=eps)
        self.pre = placement == "pre"

    def normed_input(self, x: Tensor) -> Tensor:
        """What the sublayer reads: LN(x) in pre-norm, x itself in post-norm."""
        return self.norm(x) if self.pre else x

    def residual(self, x: Tensor, sublayer_out: Tensor) -> Tensor:
        """post: LN(x + f(x)); pre: x + f(LN(x))."""
        return x + sublayer_out if self.pre else self.norm(x + sublayer_out)


class EncoderLayer(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.self_attn = MultiHeadAttention(cfg.d_model, cfg.n_heads, cfg.dropout)
        self.ffn = FeedForward(cfg.d_model, cfg.d_ff, cfg.activation, cfg.dropout)
        self.attn_sublayer = Sublayer(cfg.d_model, cfg.norm_placement, cfg.layer_norm_eps)
        self.ffn_sublayer = Sublayer(cfg.d_model, cfg.norm_placement, cfg.layer_norm_eps)

    def forward(self, x: Tensor, src_mask: Tensor) -> tuple[Tensor, Tensor]:
        """x: (B, S, D); src_mask: (B, 1, 1, S) → ((B, S, D), self-attention probs (B, H, S, S))"""
        h = self.attn_sublayer.normed_input(x)
        attn_out, probs = self.self_attn(h, h, src_mask)
        x = self.attn_sublayer.residual(x, attn_out)
        x = self.ffn_sublayer.residual(x, self.ffn(self.ffn_sublayer.normed_input(x)))
        return x, probs


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.self_attn = MultiHeadAttention(cfg.d_model, cfg.n_heads, cfg.dropout)
        self.cross_attn = MultiHeadAttention(cfg.d_model, cfg.n_heads, cfg.dropout)
        self.ffn = FeedForward(cfg.d_model, cfg.d_ff, cfg.activation, cfg.dropout)
        self.self_sublayer = Sublayer(cfg.d_model, cfg.norm_placement, cfg.layer_norm_eps)
        self.cross_sublayer = Sublayer(cfg.d_model, cfg.norm_placement, cfg.layer_norm_eps)
        self.ffn_sublayer = Sublayer(cfg.d_model, cfg.norm_placement, cfg.layer_norm_eps)

    def forward(
        self,
        y: Tensor,
        self_k: Tensor,
        self_v: Tensor,
        self_mask: Tensor,
        cross_k: Tensor,
        cross_v: Tensor,
        src_mask: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """One decoder layer over queries `y` with already projected keys/values.

        The caller projects the self-attention keys/values (so a KV cache can supply the past)
        and the cross-attention keys/values of the encoder output `memory` (computed once).
        y: (B, T, D); self_k/v: (B, H, Tk, Dh); self_mask: (B, 1, T, Tk); cross_k/v: (B, H, S, Dh);
        src_mask: (B, 1, 1, S) → (y (B, T, D), self probs (B, H, T, Tk), cross probs (B, H, T, S)).
        """
        h = self.self_sublayer.normed_input(y)
        q = self.self_attn.project_q(h)
        attn_out, self_probs = self.self_attn.attend(q, self_k, self_v, self_mask)
        y = self.self_sublayer.residual(y, attn_out)
        y, cross_probs = self.cross_and_ffn(y, cross_k, cross_v, src_mask)
        return y, self_probs, cross_probs

    def step(
        self,
        y: Tensor,
        past_k: Tensor,
        past_v: Tensor,
        past_mask: Tensor,
        cross_k: Tensor,
        cross_v: Tensor,
        src_mask: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The layer for one new token per row, its self-attention over a KV cache (`cached_attention`).

        Equal to `forward` on the cache with the token's K/V appended as an always allowed last
        slot, but the cache is only read: the token's K/V are returned for the caller to store.
        y: (B, 1, D); past_k/v: (B, H, T, Dh), T may be 0; past_mask: (B, 1, 1, T) real slots;
        cross_k/v: (B, H, S, Dh); src_mask: (B, 1, 1, S) → (y (B, 1, D), k_new, v_new (B, H, 1, Dh)).
        """
        h = self.self_sublayer.normed_input(y)  # = self_kv_input(y): one LayerNorm for Q, K and V
        k_new, v_new = self.self_attn.project_kv(h)
        q = self.self_attn.project_q(h)
        attn_out = self.self_attn.attend_cached(q, past_k, past_v, past_mask, k_new, v_new)
        y = self.self_sublayer.residual(y, attn_out)
        y, _ = self.cross_and_ffn(y, cross_k, cross_v, src_mask)
        return y, k_new, v_new

    def cross_and_ffn(
        self, y: Tensor, cross_k: Tensor, cross_v: Tensor, src_mask: Tensor
    ) -> tuple[Tensor, Tensor]:
        """The sublayers after self-attention, shared by `forward` and `step`: cross-attention
        over the encoder's projected K/V, then the feed-forward network.

        y: (B, T, D); cross_k/v: (B, H, S, Dh); src_mask: (B, 1, 1, S) → (y, cross probs (B, H, T, S)).
        """
        h = self.cross_sublayer.normed_input(y)
        attn_out, cross_probs = self.cross_attn.attend(
            self.cross_attn.project_q(h), cross_k, cross_v, src_mask
        )
        y = self.cross_sublayer.residual(y, attn_out)
        y = self.ffn_sublayer.residual(y, self.ffn(self.ffn_sublayer.normed_input(y)))
        return y, cross_probs

    def self_kv_input(self, y: Tensor) -> Tensor:
        """What the self-attention keys/values are projected from (LN(y) in pre-norm)."""
        return self.self_sublayer.normed_input(y)


@dataclass
class Attentions:
    """Attention probabilities of one pass, one tensor per layer."""

    encoder_self: list[Tensor]  # each (B, H, S, S)
    decoder_self: list[Tensor]  # each (B, H, T, T)
    cross: list[Tensor]  # each (B, H, T, S)


def padding_mask(ids: Tensor, pad_id: int) -> Tensor:
    """(B, T) token ids → (B, 1, 1, T), True at real tokens."""
    return (ids != pad_id)[:, None, None, :]


def causal_mask(length: int, device: torch.device | None = None) -> Tensor:
    """(1, 1, T, T) lower-triangular: position t sees positions ≤ t only."""
    return torch.ones(length, length, dtype=torch.bool, device=device).tril()[None, None]


class Transformer(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.src_embed = nn.Embedding(cfg.src_vocab_size, cfg.d_model, padding_idx=cfg.pad_id)
        self.tgt_embed = (
            self.src_embed
            if cfg.share_embeddings
            else nn.Embedding(cfg.vocab_size, cfg.d_model, padding_idx=cfg.pad_id)
        )
        self.positions: Tensor  # (P, D), a non-persistent buffer: derived from the config, never stored
        self.register_buffer(
            "positions",
            sinusoidal_positions(cfg.max_positions, cfg.d_model, cfg.position_layout, cfg.position_offset),
            persistent=False,
        )
        self.embed_dropout = nn.Dropout(cfg.dropout)
        self.encoder_layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.n_encoder_layers))
        self.decoder_layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.n_decoder_layers))
        # Pre-norm stacks end un-normalised, so they get a final LayerNorm; post-norm ones do not.
        pre = cfg.norm_placement == "pre"
        self.encoder_norm: nn.Module = (
            nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps) if pre else nn.Identity()
        )
        self.decoder_norm: nn.Module = (
            nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps) if pre else nn.Identity()
        )
        self.output_proj = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_output_embeddings:
            self.output_proj.weight = self.tgt_embed.weight
        self.logits_bias = nn.Parameter(torch.zeros(cfg.vocab_size)) if cfg.final_logits_bias else None
        self._init_weights()

    def _init_weights(self) -> None:
        for name, p in self.named_parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
        # Embeddings scaled by sqrt(D) start with unit variance per coordinate when drawn like this.
        nn.init.normal_(self.src_embed.weight, std=self.cfg.d_model**-0.5)
        if self.tgt_embed is not self.src_embed:
            nn.init.normal_(self.tgt_embed.weight, std=self.cfg.d_model**-0.5)
        with torch.no_grad():
            self.src_embed.weight[self.cfg.pad_id].zero_()
            self.tgt_embed.weight[self.cfg.pad_id].zero_()

    def embed(self, table: nn.Embedding, ids: Tensor, positions: Tensor) -> Tensor:
        """Token embedding (× √D when configured) + sinusoidal position.

        ids, positions: (B, T) → (B, T, D)
        """
        x = table(ids)
        if self.cfg.scale_embeddings:
            x = x * math.sqrt(self.cfg.d_model)
        return self.embed_dropout(x + self.positions[positions])

    def check_length(self, length: int, side: str) -> None:
        if length > self.cfg.max_positions:
            raise ValueError(
                f"{side} has {length} tokens, more than the model's max_positions {self.cfg.max_positions}"
            )

    def encode(self, src: Tensor, src_mask: Tensor, attentions: Attentions | None = None) -> Tensor:
        """src: (B, S) ids; src_mask: (B, 1, 1, S) → memory (B, S, D)."""
        self.check_length(src.size(1), "source")
        positions = torch.arange(src.size(1), device=src.device).expand_as(src)
        x = self.embed(self.src_embed, src, positions)
        for layer in self.encoder_layers:
            x, probs = layer(x, src_mask)
            if attentions is not None:
                attentions.encoder_self.append(probs)
        return self.encoder_norm(x)

    @property
    def decoder_stack(self) -> list[DecoderLayer]:
        """The decoder layers, typed (nn.ModuleList yields plain Modules to a type checker)."""
        return [cast(DecoderLayer, layer) for layer in self.decoder_layers]

    def cross_kv(self, memory: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Cross-attention K, V of every decoder layer: fixed for the whole decoding of a request."""
        return [layer.cross_attn.project_kv(memory) for layer in self.decoder_stack]

    def decode(
        self,
        memory: Tensor,
        src_mask: Tensor,
        tgt: Tensor,
        tgt_mask: Tensor,
        attentions: Attentions | None = None,
    ) -> Tensor:
        """Teacher-forced decoder pass over a whole prefix (no cache).

        memory: (B, S, D); src_mask: (B, 1, 1, S); tgt: (B, T) ids; tgt_mask: (B, 1, T, T) → (B, T, D).
        """
        self.check_length(tgt.size(1), "target")
        positions = torch.arange(tgt.size(1), device=tgt.device).expand_as(tgt)
        y = self.embed(self.tgt_embed, tgt, positions)
        for layer, (cross_k, cross_v) in zip(self.decoder_stack, self.cross_kv(memory), strict=True):
            self_k, self_v = layer.self_attn.project_kv(layer.self_kv_input(y))
            y, self_probs, cross_probs = layer(y, self_k, self_v, tgt_mask, cross_k, cross_v, src_mask)
            if attentions is not None:
                attentions.decoder_self.append(self_probs)
                attentions.cross.append(cross_probs)
        return self.decoder_norm(y)

    def logits(self, hidden: Tensor) -> Tensor:
        """(…, D) → (…, V)"""
        out = self.output_proj(hidden)
        return out if self.logits_bias is None else out + self.logits_bias

    def target_mask(self, tgt: Tensor) -> Tensor:
        """Causal mask combined with target padding: (B, 1, T, T). The first token is the decoder's
        start, never padding, even where it is the pad token (Marian starts from it)."""
        real = padding_mask(tgt, self.cfg.pad_id).clone()
        real[..., 0] = True
        return causal_mask(tgt.size(1), tgt.device) & real

    def forward(self, src: Tensor, tgt_in: Tensor) -> Tensor:
        """Teacher forcing: src (B, S), decoder input tgt_in (B, T) → logits (B, T, V)."""
        src_mask = padding_mask(src, self.cfg.pad_id)
        memory = self.encode(src, src_mask)
        return self.logits(self.decode(memory, src_mask, tgt_in, self.target_mask(tgt_in)))

    def attention_maps(self, src: Tensor, tgt_in: Tensor) -> tuple[Tensor, Attentions]:
        """Teacher-forced pass that also returns every attention probability (for Attend)."""
        attentions = Attentions([], [], [])
        src_mask = padding_mask(src, self.cfg.pad_id)
        memory = self.encode(src, src_mask, attentions)
        hidden = self.decode(memory, src_mask, tgt_in, self.target_mask(tgt_in), attentions)
        return F.log_softmax(self.logits(hidden), dim=-1), attentions

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
