"""An imported Marian model served beside the default model, through the real gRPC server."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from transformers import MarianMTModel, MarianTokenizer

from service.api.translator.v1 import translator_pb2 as pb
from service.api.translator.v1 import translator_pb2_grpc as pb_grpc
from tests.service.server_fixture import ServerThread, loopback_config

DEFAULT_MODEL = Path("models/en-fr-small")
MAX_NEW = 24


@pytest.fixture(scope="module")
def stub(marian_model_dir: Path, separate_model_dir: Path) -> Iterator[pb_grpc.TranslatorStub]:
    config = loopback_config()
    model_dirs = (DEFAULT_MODEL, marian_model_dir, separate_model_dir)
    config = replace(config, engine=replace(config.engine, model_dirs=model_dirs))
    with ServerThread(config) as server, grpc.insecure_channel(server.target) as channel:
        yield pb_grpc.TranslatorStub(channel)


HF = tuple[MarianTokenizer, MarianMTModel]


def _load(checkpoint: Path) -> HF:
    return MarianTokenizer.from_pretrained(checkpoint), MarianMTModel.from_pretrained(
        checkpoint, attn_implementation="eager"
    ).eval()


@pytest.fixture(scope="module")
def hf(marian_checkpoint: Path) -> HF:
    return _load(marian_checkpoint)


@pytest.fixture(scope="module")
def hf_separate(separate_checkpoint: Path) -> HF:
    return _load(separate_checkpoint)


def _generate(hf: HF, texts: list[str], beams: int) -> list[str]:
    tokenizer, model = hf
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(
            **batch, num_beams=beams, max_new_tokens=MAX_NEW, do_sample=False, forced_eos_token_id=None
        )
    return tokenizer.batch_decode(out, skip_special_tokens=True)


def test_both_models_are_listed(stub: pb_grpc.TranslatorStub) -> None:
    info = stub.GetModelInfo(pb.GetModelInfoRequest())
    assert info.default_model == "en-fr-small"
    (marian,) = [m for m in info.models if m.name == "tiny-marian"]
    assert marian.variant == pb.MODEL_VARIANT_FP32 and marian.architecture.d_model == 32
    assert (marian.source_language, marian.target_language) == ("en", "fr")


@pytest.mark.parametrize("beams", [1, 4])
@pytest.mark.parametrize("model", ["tiny-marian", "tiny-marian-separate-vocabs"])
def test_translations_equal_transformers(
    stub: pb_grpc.TranslatorStub,
    hf: HF,
    hf_separate: HF,
    tiny_corpus: dict[str, list[tuple[str, str]]],
    model: str,
    beams: int,
) -> None:
    texts = [en for en, _ in tiny_corpus["test"][:16]]
    options = pb.TranslateOptions(
        model=model,
        beam=pb.BeamSearch(beam_size=beams) if beams > 1 else None,
        stopping=pb.StoppingCriteria(max_output_tokens=MAX_NEW),
    )
    reply = stub.Translate(pb.TranslateRequest(texts=texts, options=options))
    expected = _generate(hf if model == "tiny-marian" else hf_separate, texts, beams)
    assert [t.hypotheses[0].text for t in reply.translations] == expected
    default = stub.Translate(pb.TranslateRequest(texts=["I love cats."]))  # the other model, unchanged
    assert default.translations[0].hypotheses[0].text == "J'aime les chats."


def test_stream_and_n_best_work(stub: pb_grpc.TranslatorStub, tiny_corpus) -> None:
    text = tiny_corpus["test"][0][0]
    stopping = pb.StoppingCriteria(max_output_tokens=MAX_NEW)
    unary = stub.Translate(
        pb.TranslateRequest(texts=[text], options=pb.TranslateOptions(model="tiny-marian", stopping=stopping))
    )
    stream = stub.TranslateStream(
        pb.TranslateStreamRequest(
            text=text, options=pb.TranslateOptions(model="tiny-marian", stopping=stopping)
        )
    )
    *deltas, final = list(stream)
    assert "".join(m.delta.text for m in deltas) == unary.translations[0].text
    assert final.final.translations[0].text == unary.translations[0].text
    nbest = stub.Translate(
        pb.TranslateRequest(
            texts=[text],
            options=pb.TranslateOptions(
                model="tiny-marian", beam=pb.BeamSearch(beam_size=4), n_best=3, stopping=stopping
            ),
        )
    )
    assert len(nbest.translations[0].hypotheses) == 3


def test_cross_attention_equals_transformers(stub: pb_grpc.TranslatorStub, hf: HF, tiny_corpus) -> None:
    tokenizer, model = hf
    source, target = tiny_corpus["test"][3]
    reply = stub.Attend(
        pb.AttendRequest(model="tiny-marian", source=source, target=target, layers=[0, 1], heads=[0, 1, 2, 3])
    )
    src = tokenizer(source, return_tensors="pt")
    tgt = tokenizer(text_target=target)["input_ids"]  # target ids + end token
    decoder_input = torch.tensor([[model.config.decoder_start_token_id, *tgt[:-1]]])
    with torch.no_grad():
        out = model(**src, decoder_input_ids=decoder_input, output_attentions=True)
    assert len(reply.matrices) == 2 * 4
    for matrix in reply.matrices:
        expected = out.cross_attentions[matrix.layer][0, matrix.head].numpy()
        got = np.array(matrix.values, dtype=np.float32).reshape(matrix.rows, matrix.cols)
        np.testing.assert_allclose(got, expected, atol=1e-4)


def test_attend_names_source_tokens_from_the_source_vocabulary(
    stub: pb_grpc.TranslatorStub, hf_separate: HF, tiny_corpus
) -> None:
    tokenizer, model = hf_separate
    source, target = tiny_corpus["test"][5]
    reply = stub.Attend(
        pb.AttendRequest(model="tiny-marian-separate-vocabs", source=source, target=target, layers=[1])
    )
    source_ids = tokenizer(source)["input_ids"]
    source_vocab = {i: piece for piece, i in tokenizer.encoder.items()}
    target_vocab = {i: piece for piece, i in tokenizer.target_encoder.items()}
    target_ids = tokenizer(text_target=target)["input_ids"]
    assert list(reply.source_tokens) == [source_vocab[i] for i in source_ids]
    assert list(reply.source_tokens) == [*tokenizer.spm_source.encode(source, out_type=str), "</s>"]
    assert list(reply.target_tokens) == [target_vocab[i] for i in target_ids]
    assert list(reply.source_tokens) != [target_vocab.get(i, "") for i in source_ids]  # the ids differ
    src = tokenizer(source, return_tensors="pt")
    decoder_input = torch.tensor([[model.config.decoder_start_token_id, *target_ids[:-1]]])
    with torch.no_grad():
        out = model(**src, decoder_input_ids=decoder_input, output_attentions=True)
    averaged = out.cross_attentions[1][0].mean(dim=0).numpy()  # layer 1, its heads averaged
    (matrix,) = reply.matrices
    got = np.array(matrix.values, dtype=np.float32).reshape(matrix.rows, matrix.cols)
    np.testing.assert_allclose(got, averaged, atol=1e-4)


def test_bad_requests_for_the_imported_model_are_refused(stub: pb_grpc.TranslatorStub) -> None:
    with pytest.raises(grpc.RpcError) as err:
        stub.Translate(
            pb.TranslateRequest(
                texts=["x"],
                options=pb.TranslateOptions(model="tiny-marian", beam=pb.BeamSearch(beam_size=99)),
            )
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
