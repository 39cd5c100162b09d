"""The configuration of the Transformer family (export.model): plain data, no torch.

Apart from export.model, so that what only reads a configuration (a manifest's `architecture`,
the graph contract of export.onnx.contract, the variants of export.variants) imports no torch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

Activation = Literal["relu", "gelu", "swish"]
NormPlacement = Literal["post", "pre"]
# How the sinusoids are laid out over the model dimension (same angles pos / 10000^(2i/D) unless
# named otherwise): "interleaved" sin at even and cos at odd dimensions (the paper, this project's
# own models); "marian" sines in the first half, cosines in the second (Marian, OPUS-MT);
# "fairseq" halves too, with angles pos · exp(-i · ln(10000) / (D/2 - 1)) (M2M100, NLLB).
PositionLayout = Literal["interleaved", "marian", "fairseq"]

# Fields added after the first models were exported: left out of `to_dict` at their defaults, so
# the config.json and manifest of a model that does not use them stay byte for byte as written.
_LATER_FIELDS = ("position_layout", "position_offset", "source_vocab_size")


@dataclass(frozen=True)
class TransformerConfig:
    """Everything needed to build a model of this family (and to host other checkpoints of it)."""

    vocab_size: int  # the target vocabulary (V), and the source one unless source_vocab_size says otherwise
    d_model: int = 256  # width of every residual stream
    n_heads: int = 4  # attention heads; d_k = d_model / n_heads
    n_encoder_layers: int = 3
    n_decoder_layers: int = 3
    d_ff: int = 1024  # inner width of the position-wise feed-forward network
    activation: Activation = "relu"
    norm_placement: NormPlacement = "post"  # post: LN(x + f(x)) as in the paper; pre: x + f(LN(x))
    scale_embeddings: bool = True  # multiply token embeddings by sqrt(d_model)
    share_embeddings: bool = True  # one embedding table for source and target tokens
    tie_output_embeddings: bool = True  # output projection = target embedding matrix transposed
    final_logits_bias: bool = False  # a learned bias added to the output logits
    max_positions: int = 256  # longest sequence (in tokens, specials included) on either side
    dropout: float = 0.1
    layer_norm_eps: float = 1e-5
    pad_id: int = 0
    bos_id: int = 1  # decoder start token
    eos_id: int = 2
    unk_id: int = 3
    position_layout: PositionLayout = "interleaved"
    position_offset: int = 0  # the first token's position (M2M100 / NLLB count from pad_id + 1)
    # The source vocabulary's size where it differs from the target's (separate vocabularies, e.g.
    # some OPUS-MT models); None: the same as vocab_size. Needs share_embeddings false.
    source_vocab_size: int | None = None

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        if self.activation not in ("relu", "gelu", "swish"):
            raise ValueError(f"unknown activation {self.activation!r}: use relu, gelu or swish")
        if self.norm_placement not in ("post", "pre"):
            raise ValueError(f"unknown norm placement {self.norm_placement!r}: use post or pre")
        if self.position_layout not in ("interleaved", "marian", "fairseq"):
            raise ValueError(
                f"unknown position layout {self.position_layout!r}: use interleaved, marian or fairseq"
            )
        if self.position_offset < 0:
            raise ValueError(f"position_offset {self.position_offset} is negative")
        if self.source_vocab_size is not None:
            if self.source_vocab_size < 1:
                raise ValueError(f"source_vocab_size {self.source_vocab_size} is not positive")
            if self.share_embeddings and self.source_vocab_size != self.vocab_size:
                raise ValueError(
                    f"source_vocab_size {self.source_vocab_size} differs from vocab_size {self.vocab_size}: "
                    "one shared embedding table cannot hold both (share_embeddings false)"
                )

    @property
    def src_vocab_size(self) -> int:
        """The source vocabulary's size: the encoder's embedding rows."""
        return self.vocab_size if self.source_vocab_size is None else self.source_vocab_size

    @property
    def d_k(self) -> int:
        return self.d_model // self.n_heads

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        defaults = TransformerConfig(vocab_size=self.vocab_size)
        for name in _LATER_FIELDS:
            if values[name] == getattr(defaults, name):
                del values[name]
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TransformerConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown config fields: {', '.join(unknown)}")
        return cls(**values)
