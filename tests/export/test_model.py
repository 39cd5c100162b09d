"""export.model: attention math, positional encoding, masks, padding, configuration."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from export.model import (
    MultiHeadAttention,
    TransformerConfig,
    cached_attention,
    causal_mask,
    padding_mask,
    scaled_dot_product_attention,
    sinusoidal_positions,
)


def softmax(values: list[float]) -> list[float]:
    """Softmax in plain Python, independent of torch."""
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    total = sum(exps)
    return [e / total for e in exps]


def reference_attention(
    q: list[list[float]], k: list[list[float]], v: list[list[float]], allowed: list[bool] | None = None
) -> tuple[list[list[float]], list[list[float]]]:
    """softmax(q·k / √d) · v for one head, with plain Python lists; masked keys are skipped."""
    d = len(q[0])
    allowed = allowed or [True] * len(k)
    outputs, probs = [], []
    for query in q:
        keep = [j for j, ok in enumerate(allowed) if ok]
        scores = [sum(a * b for a, b in zip(query, k[j], strict=True)) / math.sqrt(d) for j in keep]
        p_kept = softmax(scores)
        row = [0.0] * len(k)
        for j, p in zip(keep, p_kept, strict=True):
            row[j] = p
        probs.append(row)
        outputs.append([sum(row[j] * v[j][c] for j in range(len(k))) for c in range(len(v[0]))])
    return outputs, probs


def as_bhtd(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)[None, None]


# --- scaled dot-product attention --------------------------------------------------------------


def test_attention_single_query_by_hand() -> None:
    q = as_bhtd([[1.0, 0.0]])
    k = as_bhtd([[1.0, 0.0], [0.0, 1.0]])
    v = as_bhtd([[1.0, 2.0], [3.0, 4.0]])
    out, probs = scaled_dot_product_attention(q, k, v, None)

    # scores = [1/√2, 0] → p0 = e^{1/√2} / (e^{1/√2} + 1)
    e = math.exp(1 / math.sqrt(2))
    p0, p1 = e / (e + 1), 1 / (e + 1)
    assert probs.shape == (1, 1, 1, 2)
    assert probs[0, 0, 0].tolist() == pytest.approx([p0, p1], abs=1e-6)
    assert out[0, 0, 0].tolist() == pytest.approx([p0 * 1 + p1 * 3, p0 * 2 + p1 * 4], abs=1e-6)


def test_attention_several_queries_by_hand() -> None:
    q = [[0.5, -1.0, 2.0, 0.0], [1.0, 1.0, -0.5, 0.25]]
    k = [[1.0, 0.0, 0.5, -1.0], [0.0, 2.0, 1.0, 0.0], [-1.0, 0.5, 0.0, 1.5]]
    v = [[1.0, 0.0, -2.0, 3.0], [0.5, 1.5, 0.0, -1.0], [2.0, -1.0, 1.0, 0.0]]
    want_out, want_probs = reference_attention(q, k, v)
    out, probs = scaled_dot_product_attention(as_bhtd(q), as_bhtd(k), as_bhtd(v), None)
    assert out.shape == (1, 1, 2, 4)
    for row in range(2):
        assert probs[0, 0, row].tolist() == pytest.approx(want_probs[row], abs=1e-6)
        assert out[0, 0, row].tolist() == pytest.approx(want_out[row], abs=1e-6)


def test_masked_keys_get_zero_probability() -> None:
    q = [[0.3, -0.2], [1.0, 0.7]]
    k = [[1.0, 2.0], [5.0, 5.0], [-1.0, 0.5]]  # the masked key would otherwise dominate
    v = [[1.0, 1.0], [100.0, 100.0], [-1.0, 2.0]]
    allowed = [True, False, True]
    mask = torch.tensor(allowed)[None, None, None, :]  # (1, 1, 1, Tk) broadcasts over queries
    out, probs = scaled_dot_product_attention(as_bhtd(q), as_bhtd(k), as_bhtd(v), mask)
    want_out, want_probs = reference_attention(q, k, v, allowed)
    assert torch.all(probs[..., 1] == 0.0)
    for row in range(2):
        assert probs[0, 0, row].tolist() == pytest.approx(want_probs[row], abs=1e-6)
        assert out[0, 0, row].tolist() == pytest.approx(want_out[row], abs=1e-5)


def test_scores_are_scaled_by_inverse_sqrt_dk() -> None:
    # q·k_j = s_j whatever d_k: only the 1/√d_k factor differs between the two cases.
    s = [2.0, 0.0, -1.0]
    for d_k in (1, 4, 9):
        q = torch.zeros(1, 1, 1, d_k)
        q[..., 0] = 1.0
        k = torch.zeros(1, 1, 3, d_k)
        k[0, 0, :, 0] = torch.tensor(s)
        _, probs = scaled_dot_product_attention(q, k, torch.zeros(1, 1, 3, d_k), None)
        assert probs[0, 0, 0].tolist() == pytest.approx(softmax([x / math.sqrt(d_k) for x in s]), abs=1e-6)
        if d_k > 1:
            assert probs[0, 0, 0].tolist() != pytest.approx(softmax(s), abs=1e-3)


def test_fully_masked_row_stays_finite() -> None:
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 1, 2, 4), torch.randn(1, 1, 3, 4), torch.randn(1, 1, 3, 4)
    mask = torch.tensor([[True, False, True], [False, False, False]])[None, None]
    out, probs = scaled_dot_product_attention(q, k, v, mask)
    assert torch.isfinite(out).all() and torch.isfinite(probs).all()
    assert probs[0, 0, 0, 1] == 0.0
    assert probs[0, 0, 1].sum().item() == pytest.approx(1.0, abs=1e-6)


def _scattered_mask(batch: int, slots: int) -> torch.Tensor:
    """(B, 1, 1, T) real slots in no contiguous pattern; the last row has none at all."""
    mask = torch.rand(batch, slots, generator=torch.Generator().manual_seed(1)) < 0.6
    mask[-1] = False
    return mask[:, None, None, :]


@pytest.mark.parametrize("slots", [0, 1, 6])
def test_cached_attention_equals_attention_over_the_appended_cache(slots: int) -> None:
    """The new token's K/V kept apart from the cache give what appending them as an always
    allowed last slot gives, whatever the cache's real slots (none, scattered, all masked)."""
    torch.manual_seed(0)
    q, k_new, v_new = (torch.randn(3, 2, 1, 4) for _ in range(3))
    past_k, past_v = torch.randn(3, 2, slots, 4), torch.randn(3, 2, slots, 4)
    mask = _scattered_mask(3, slots)
    got = cached_attention(q, past_k, past_v, mask, k_new, v_new)
    grown = torch.cat([mask, torch.ones(3, 1, 1, 1, dtype=torch.bool)], dim=-1)
    want, _ = scaled_dot_product_attention(
        q, torch.cat([past_k, k_new], dim=2), torch.cat([past_v, v_new], dim=2), grown
    )
    assert got.shape == (3, 2, 1, 4)
    assert torch.allclose(got, want, atol=1e-6)
    assert torch.allclose(got[-1], v_new[-1], atol=1e-6)  # nothing real in the cache: itself only


# --- multi-head attention ----------------------------------------------------------------------


def test_split_and_merge_heads_round_trip() -> None:
    torch.manual_seed(0)
    mha = MultiHeadAttention(d_model=12, n_heads=3, dropout=0.0)
    x = torch.randn(2, 5, 12)
    heads = mha.split_heads(x)
    assert heads.shape == (2, 3, 5, 4)
    for h in range(3):  # head h holds feature columns h*Dh .. (h+1)*Dh - 1
        assert torch.equal(heads[:, h], x[:, :, 4 * h : 4 * (h + 1)])
    assert torch.equal(mha.merge_heads(heads), x)


@pytest.mark.parametrize(("tq", "tk"), [(5, 5), (3, 7)])
def test_multi_head_attention_shapes_and_probabilities(tq: int, tk: int) -> None:
    torch.manual_seed(0)
    mha = MultiHeadAttention(d_model=16, n_heads=2, dropout=0.0).eval()
    query, key_value = torch.randn(2, tq, 16), torch.randn(2, tk, 16)
    mask = torch.ones(2, 1, 1, tk, dtype=torch.bool)
    mask[1, ..., tk - 2 :] = False  # the second example has two padded keys
    out, probs = mha(query, key_value, mask)
    assert out.shape == (2, tq, 16)
    assert probs.shape == (2, 2, tq, tk)
    assert torch.allclose(probs.sum(-1), torch.ones(2, 2, tq), atol=1e-6)
    assert torch.all(probs[1, ..., tk - 2 :] == 0.0)


def test_multi_head_attention_equals_per_head_computation() -> None:
    torch.manual_seed(0)
    d_model, n_heads, d_k = 8, 2, 4
    mha = MultiHeadAttention(d_model, n_heads, dropout=0.0).eval()
    query, key_value = torch.randn(1, 3, d_model), torch.randn(1, 4, d_model)
    allowed = torch.tensor([True, True, False, True])
    out, probs = mha(query, key_value, allowed[None, None, None, :])

    def project(linear: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
        return x @ linear.weight.T + linear.bias  # X W + b

    q_all = project(mha.w_q, query[0])
    k_all, v_all = project(mha.w_k, key_value[0]), project(mha.w_v, key_value[0])
    heads = []
    for h in range(n_heads):
        cols = slice(h * d_k, (h + 1) * d_k)
        q, k, v = q_all[:, cols], k_all[:, cols], v_all[:, cols]
        scores = q @ k.T / math.sqrt(d_k)
        scores[:, ~allowed] = float("-inf")
        p = scores.softmax(-1)
        assert torch.allclose(probs[0, h], p, atol=1e-6)
        heads.append(p @ v)
    want = project(mha.w_o, torch.cat(heads, dim=-1))
    assert torch.allclose(out[0], want, atol=1e-5)


# --- positional encoding -----------------------------------------------------------------------


@pytest.mark.parametrize("d_model", [4, 6, 16])
def test_sinusoidal_positions_formula(d_model: int) -> None:
    pe = sinusoidal_positions(50, d_model)
    assert pe.shape == (50, d_model)
    for pos in (0, 1, 7, 49):
        for i in range(d_model // 2):
            angle = pos / 10000 ** (2 * i / d_model)
            assert pe[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-5)
            assert pe[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-5)


def test_sinusoidal_positions_first_row_and_odd_width() -> None:
    assert sinusoidal_positions(3, 8)[0].tolist() == [0.0, 1.0] * 4  # sin 0, cos 0
    pe = sinusoidal_positions(10, 5)  # odd width: the last column is a sine
    assert pe.shape == (10, 5)
    assert pe[3, 4].item() == pytest.approx(math.sin(3 / 10000 ** (4 / 5)), abs=1e-6)
    assert pe[3, 3].item() == pytest.approx(math.cos(3 / 10000 ** (2 / 5)), abs=1e-6)


@pytest.mark.parametrize("d_model", [64, 512])
def test_marian_and_fairseq_layouts_equal_transformers_tables(d_model: int) -> None:
    from transformers.models.m2m_100.modeling_m2m_100 import M2M100SinusoidalPositionalEmbedding
    from transformers.models.marian.modeling_marian import MarianSinusoidalPositionalEmbedding

    marian = MarianSinusoidalPositionalEmbedding(300, d_model).create_weight()
    assert torch.equal(sinusoidal_positions(300, d_model, "marian"), marian)
    # M2M100 / NLLB: row pad_id + 1 + t is the t-th token's (pad_id 1 here)
    fairseq = M2M100SinusoidalPositionalEmbedding.get_embedding(300 + 2, d_model, padding_idx=1)
    assert torch.equal(sinusoidal_positions(300, d_model, "fairseq", offset=2), fairseq[2:])


def test_target_mask_admits_a_start_token_equal_to_pad(tiny_model) -> None:
    """Marian decodes from the pad token: column 0 stays visible, later pads stay masked."""
    model = tiny_model()
    pad = model.cfg.pad_id
    mask = model.target_mask(torch.tensor([[pad, 5, 6, pad]]))
    assert mask[0, 0, :, 0].all() and not mask[0, 0, :, 3].any()


# --- masks -------------------------------------------------------------------------------------


def test_mask_helpers() -> None:
    ids = torch.tensor([[5, 6, 0], [7, 0, 0]])
    assert padding_mask(ids, 0).tolist() == [[[[True, True, False]]], [[[True, False, False]]]]
    assert causal_mask(3)[0, 0].tolist() == [[True, False, False], [True, True, False], [True, True, True]]


# --- the model ---------------------------------------------------------------------------------


@pytest.mark.parametrize("norm_placement", ["post", "pre"])
@pytest.mark.parametrize("activation", ["relu", "gelu", "swish"])
def test_causal_mask_blocks_the_future(tiny_model, norm_placement: str, activation: str) -> None:
    model = tiny_model(seed=1, norm_placement=norm_placement, activation=activation)
    src = torch.tensor([[5, 9, 11, 2], [7, 8, 2, 0]])
    tgt = torch.tensor([[1, 6, 13, 4, 10, 12], [1, 15, 5, 17, 19, 7]])
    changed = tgt.clone()
    changed[:, 3] = torch.tensor([20, 21])  # a different token at position 3 only
    with torch.no_grad():
        before, after = model(src, tgt), model(src, changed)
    assert torch.allclose(before[:, :3], after[:, :3], atol=1e-6)
    assert not torch.allclose(before[:, 3:], after[:, 3:], atol=1e-3)  # the change does propagate


@pytest.mark.parametrize("norm_placement", ["post", "pre"])
def test_padding_does_not_change_results(tiny_model, padded, norm_placement: str) -> None:
    model = tiny_model(seed=2, norm_placement=norm_placement)
    short_src, long_src = [5, 9, 11, 2], [7, 8, 12, 13, 14, 15, 4, 2]
    short_tgt, long_tgt = [1, 6, 13], [1, 15, 5, 17, 19, 7, 9]
    src, tgt = padded([short_src, long_src]), padded([short_tgt, long_tgt])
    alone_src, alone_tgt = torch.tensor([short_src]), torch.tensor([short_tgt])
    with torch.no_grad():
        memory_batch = model.encode(src, padding_mask(src, 0))
        memory_alone = model.encode(alone_src, padding_mask(alone_src, 0))
        logits_batch, logits_alone = model(src, tgt), model(alone_src, alone_tgt)
        logits_long = model(torch.tensor([long_src]), torch.tensor([long_tgt]))
    assert torch.allclose(memory_batch[0, : len(short_src)], memory_alone[0], atol=1e-5)
    assert torch.allclose(logits_batch[0, : len(short_tgt)], logits_alone[0], atol=1e-5)
    assert torch.allclose(logits_batch[1], logits_long[0], atol=1e-5)


@pytest.mark.parametrize("norm_placement", ["post", "pre"])
def test_decoder_layer_step_equals_forward_over_the_grown_cache(tiny_model, norm_placement: str) -> None:
    """`DecoderLayer.step` (the exported decoder step) computes what `forward` computes with the
    new token's K/V appended to the cache, and returns those K/V."""
    model = tiny_model(seed=3, norm_placement=norm_placement)
    layer = model.decoder_stack[0]
    torch.manual_seed(0)
    batch, slots, src_len, d = 3, 5, 4, model.cfg.d_model
    y = torch.randn(batch, 1, d)
    past_k, past_v = layer.self_attn.project_kv(torch.randn(batch, slots, d))
    cross_k, cross_v = layer.cross_attn.project_kv(torch.randn(batch, src_len, d))
    mask, src_mask = _scattered_mask(batch, slots), torch.ones(batch, 1, 1, src_len, dtype=torch.bool)
    with torch.no_grad():
        got, k_new, v_new = layer.step(y, past_k, past_v, mask, cross_k, cross_v, src_mask)
        want_k, want_v = layer.self_attn.project_kv(layer.self_kv_input(y))
        grown = torch.cat([mask, torch.ones(batch, 1, 1, 1, dtype=torch.bool)], dim=-1)
        want, _, _ = layer(
            y,
            torch.cat([past_k, want_k], dim=2),
            torch.cat([past_v, want_v], dim=2),
            grown,
            cross_k,
            cross_v,
            src_mask,
        )
    assert torch.allclose(k_new, want_k) and torch.allclose(v_new, want_v)
    assert torch.allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("scale_embeddings", [True, False])
@pytest.mark.parametrize("final_logits_bias", [True, False])
@pytest.mark.parametrize(("share", "tie"), [(True, True), (True, False), (False, True), (False, False)])
def test_embedding_and_output_flags(
    tiny_model, scale_embeddings: bool, final_logits_bias: bool, share: bool, tie: bool
) -> None:
    model = tiny_model(
        seed=3,
        scale_embeddings=scale_embeddings,
        final_logits_bias=final_logits_bias,
        share_embeddings=share,
        tie_output_embeddings=tie,
    )
    assert (model.tgt_embed is model.src_embed) == share
    assert (model.output_proj.weight is model.tgt_embed.weight) == tie
    assert (model.logits_bias is not None) == final_logits_bias
    src, tgt = torch.tensor([[5, 6, 7, 2]]), torch.tensor([[1, 8, 9]])
    with torch.no_grad():
        logits = model(src, tgt)
        assert logits.shape == (1, 3, 24)
        assert torch.isfinite(logits).all()
        ids, positions = torch.tensor([[4, 0, 10]]), torch.tensor([[0, 1, 2]])
        factor = math.sqrt(16) if scale_embeddings else 1.0
        want = model.tgt_embed.weight[ids] * factor + sinusoidal_positions(32, 16)[positions]
        assert torch.allclose(model.embed(model.tgt_embed, ids, positions), want, atol=1e-6)
        assert torch.all(model.tgt_embed.weight[0] == 0.0)  # the pad row
        if final_logits_bias:
            hidden = torch.randn(2, 16)
            model.logits_bias.fill_(0.5)
            assert torch.allclose(model.logits(hidden), model.output_proj(hidden) + 0.5)


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="divisible"):
        TransformerConfig(vocab_size=20, d_model=30, n_heads=4)
    with pytest.raises(ValueError, match="activation 'tanh'"):
        TransformerConfig(vocab_size=20, activation="tanh")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="norm placement"):
        TransformerConfig(vocab_size=20, norm_placement="sandwich")  # type: ignore[arg-type]
    assert TransformerConfig(vocab_size=20, d_model=32, n_heads=4).d_k == 8
    with pytest.raises(ValueError, match="one shared embedding table cannot hold both"):
        TransformerConfig(vocab_size=20, source_vocab_size=30)  # share_embeddings by default
    with pytest.raises(ValueError, match="source_vocab_size 0 is not positive"):
        TransformerConfig(vocab_size=20, source_vocab_size=0, share_embeddings=False)


def test_a_source_vocabulary_of_its_own_sizes_the_encoder_table(tiny_model) -> None:
    model = tiny_model(seed=5, source_vocab_size=40, share_embeddings=False)
    assert model.cfg.src_vocab_size == 40 and model.src_embed.weight.shape == (40, 16)
    assert model.tgt_embed.weight.shape == model.output_proj.weight.shape == (24, 16)
    with torch.no_grad():  # source ids beyond the target vocabulary are read; logits are over the target's
        assert model(torch.tensor([[39, 30, 2]]), torch.tensor([[1, 5]])).shape == (1, 2, 24)
    assert tiny_model().cfg.src_vocab_size == 24


def test_config_dict_round_trip_and_unknown_fields(tiny_config) -> None:
    cfg = tiny_config(activation="gelu", norm_placement="pre")
    assert TransformerConfig.from_dict(cfg.to_dict()) == cfg
    fairseq = tiny_config(position_layout="fairseq", position_offset=2)
    assert TransformerConfig.from_dict(fairseq.to_dict()) == fairseq
    # fields added later are written only when used: older models' config.json stay as they were
    assert "position_layout" not in cfg.to_dict() and fairseq.to_dict()["position_offset"] == 2
    separate = tiny_config(source_vocab_size=40, share_embeddings=False)
    assert TransformerConfig.from_dict(separate.to_dict()) == separate
    assert "source_vocab_size" not in cfg.to_dict() and separate.to_dict()["source_vocab_size"] == 40
    with pytest.raises(ValueError, match="unknown config fields: bogus, extra"):
        TransformerConfig.from_dict({**cfg.to_dict(), "extra": 1, "bogus": 2})


def test_check_length_names_max_positions(tiny_model) -> None:
    model = tiny_model(max_positions=8)
    ok_src = torch.full((1, 8), 5)
    with torch.no_grad():
        model(ok_src, torch.tensor([[1, 5]]))  # exactly max_positions is accepted
        with pytest.raises(ValueError, match=r"source has 9 tokens.*max_positions 8"):
            model(torch.full((1, 9), 5), torch.tensor([[1, 5]]))
        with pytest.raises(ValueError, match=r"target has 9 tokens.*max_positions 8"):
            model(ok_src, torch.full((1, 9), 5))


def test_attention_maps(tiny_model, padded) -> None:
    model = tiny_model(seed=4, n_encoder_layers=2, n_decoder_layers=1)
    src = padded([[5, 6, 7, 8, 2], [9, 10, 2]])  # the second source has 2 pad positions
    tgt = padded([[1, 11, 12, 13], [1, 14, 15, 16]])
    with torch.no_grad():
        log_probs, att = model.attention_maps(src, tgt)
        logits = model(src, tgt)
    assert torch.allclose(log_probs, F.log_softmax(logits, dim=-1), atol=1e-6)
    assert len(att.encoder_self) == 2 and len(att.decoder_self) == 1 and len(att.cross) == 1
    for probs in att.encoder_self:
        assert probs.shape == (2, 2, 5, 5)
        assert torch.allclose(probs.sum(-1), torch.ones(2, 2, 5), atol=1e-6)
        assert torch.all(probs[1, :, :, 3:] == 0.0)
    for probs in att.decoder_self:
        assert probs.shape == (2, 2, 4, 4)
        assert torch.allclose(probs.sum(-1), torch.ones(2, 2, 4), atol=1e-6)
        assert torch.all(probs.triu(diagonal=1) == 0.0)  # no weight on future positions
    for probs in att.cross:
        assert probs.shape == (2, 2, 4, 5)
        assert torch.allclose(probs.sum(-1), torch.ones(2, 2, 4), atol=1e-6)
        assert torch.all(probs[1, :, :, 3:] == 0.0)
        assert torch.all(probs[0] > 0.0)


def test_num_parameters_counts_tied_weights_once(tiny_model) -> None:
    tied, untied = tiny_model(), tiny_model(share_embeddings=False, tie_output_embeddings=False)
    assert untied.num_parameters() - tied.num_parameters() == 2 * 24 * 16
