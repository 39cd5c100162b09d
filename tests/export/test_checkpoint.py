"""export.checkpoint: safetensors + config.json round trips, tied weights stored once, clear errors."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors import safe_open

from export.checkpoint import CONFIG_FILE, WEIGHTS_FILE, load_config, load_model, save_model

SRC = torch.tensor([[5, 9, 11, 2, 0], [7, 8, 12, 13, 2]])
TGT_IN = torch.tensor([[1, 6, 13, 0], [1, 15, 5, 17]])


def stored_names(model_dir) -> set[str]:
    with safe_open(str(model_dir / WEIGHTS_FILE), framework="pt") as f:
        return set(f.keys())


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"share_embeddings": False, "tie_output_embeddings": False, "final_logits_bias": True},
        {"share_embeddings": False, "tie_output_embeddings": True, "norm_placement": "pre"},
        {"share_embeddings": True, "tie_output_embeddings": False, "activation": "gelu"},
    ],
)
def test_round_trip_gives_identical_outputs(tiny_model, tmp_path, overrides: dict) -> None:
    model = tiny_model(seed=5, **overrides)
    if model.logits_bias is not None:
        with torch.no_grad():
            model.logits_bias.normal_()  # not all zeros, so that losing it would show
    save_model(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert not loaded.training
    assert loaded.cfg == model.cfg
    assert json.loads((tmp_path / "m" / CONFIG_FILE).read_text()) == model.cfg.to_dict()
    with torch.no_grad():
        assert torch.equal(loaded(SRC, TGT_IN), model(SRC, TGT_IN))
    loaded_state = loaded.state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded_state[name], tensor), name


def test_tied_weights_are_stored_once_and_stay_tied(tiny_model, tmp_path) -> None:
    model = tiny_model(seed=6, share_embeddings=True, tie_output_embeddings=True)
    save_model(model, tmp_path)
    names = stored_names(tmp_path)
    assert "src_embed.weight" in names
    assert "tgt_embed.weight" not in names
    assert "output_proj.weight" not in names
    loaded = load_model(tmp_path)
    assert loaded.tgt_embed is loaded.src_embed
    assert loaded.output_proj.weight is loaded.src_embed.weight
    assert torch.equal(loaded.output_proj.weight, model.src_embed.weight)


def test_output_tied_to_separate_target_embedding(tiny_model, tmp_path) -> None:
    model = tiny_model(seed=7, share_embeddings=False, tie_output_embeddings=True)
    save_model(model, tmp_path)
    names = stored_names(tmp_path)
    assert {"src_embed.weight", "tgt_embed.weight"} <= names
    assert "output_proj.weight" not in names
    loaded = load_model(tmp_path)
    assert loaded.output_proj.weight is loaded.tgt_embed.weight
    assert not torch.equal(loaded.src_embed.weight, loaded.tgt_embed.weight)


def test_untied_weights_are_all_stored(tiny_model, tmp_path) -> None:
    model = tiny_model(seed=8, share_embeddings=False, tie_output_embeddings=False)
    save_model(model, tmp_path)
    assert {"src_embed.weight", "tgt_embed.weight", "output_proj.weight"} <= stored_names(tmp_path)
    loaded = load_model(tmp_path)
    assert loaded.output_proj.weight is not loaded.tgt_embed.weight
    assert torch.equal(loaded.output_proj.weight, model.output_proj.weight)


def test_missing_config_names_the_file(tmp_path) -> None:
    path = re.escape(str(tmp_path / CONFIG_FILE))
    with pytest.raises(FileNotFoundError, match=path + ".*missing model config"):
        load_model(tmp_path)


def test_missing_weights_name_the_file(tiny_model, tmp_path) -> None:
    save_model(tiny_model(), tmp_path)
    (tmp_path / WEIGHTS_FILE).unlink()
    path = re.escape(str(tmp_path / WEIGHTS_FILE))
    with pytest.raises(FileNotFoundError, match=path + ".*missing model weights"):
        load_model(tmp_path)


def test_unknown_config_field_is_rejected(tiny_model, tmp_path) -> None:
    save_model(tiny_model(), tmp_path)
    values = json.loads((tmp_path / CONFIG_FILE).read_text())
    (tmp_path / CONFIG_FILE).write_text(json.dumps({**values, "rotary": True}))
    with pytest.raises(ValueError, match="rotary"):
        load_model(tmp_path)


def test_unknown_config_field_error_names_the_file(tiny_model, tmp_path) -> None:
    save_model(tiny_model(), tmp_path)
    values = json.loads((tmp_path / CONFIG_FILE).read_text())
    (tmp_path / CONFIG_FILE).write_text(json.dumps({**values, "rotary": True}))
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / CONFIG_FILE))):
        load_config(tmp_path)


@pytest.mark.parametrize(("saved_bias", "config_bias"), [(True, False), (False, True)])
def test_weights_that_do_not_match_the_config_name_the_file(
    tiny_model, tmp_path, saved_bias: bool, config_bias: bool
) -> None:
    save_model(tiny_model(final_logits_bias=saved_bias), tmp_path)
    values = json.loads((tmp_path / CONFIG_FILE).read_text())
    (tmp_path / CONFIG_FILE).write_text(json.dumps({**values, "final_logits_bias": config_bias}))
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / WEIGHTS_FILE)) + ".*logits_bias"):
        load_model(tmp_path)
