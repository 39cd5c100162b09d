"""Imported Marian and NLLB models served beside the default model, through the real gRPC server."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from transformers import M2M100ForConditionalGeneration, MarianMTModel, MarianTokenizer, NllbTokenizer

from service.api.translator.v1 import translator_pb2 as pb
from service.api.translator.v1 import translator_pb2_grpc as pb_grpc
from tests.export.import_hf.tiny_checkpoints import GENERATION_BEAMS, NLLB_LANGUAGES
from tests.service.server_fixture import ServerThread, loopback_config

DEFAULT_MODEL = Path("models/en-fr-small")
MAX_NEW = 24


@pytest.fixture(scope="module")
def server(marian_model_dir: Path, separate_model_dir: Path, nllb_model_dir: Path) -> Iterator[ServerThread]:
    config = loopback_config()
    models = (DEFAULT_MODEL, marian_model_dir, separate_model_dir, nllb_model_dir)
    with ServerThread(replace(config, engine=replace(config.engine, model_dirs=models))) as running:
        yield running


@pytest.fixture(scope="module")
def stub(server: ServerThread) -> Iterator[pb_grpc.TranslatorStub]:
    with grpc.insecure_channel(server.target) as channel:
        yield pb_grpc.TranslatorStub(channel)


@pytest.fixture(scope="module")
def stub_target(server: ServerThread) -> str:
    return server.target


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
        out = model.generate(**batch, num_beams=beams, max_new_tokens=MAX_NEW, do_sample=False)
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
        greedy=pb.Greedy() if beams == 1 else None,
        stopping=pb.StoppingCriteria(max_output_tokens=MAX_NEW),
    )
    reply = stub.Translate(pb.TranslateRequest(texts=texts, options=options))
    expected = _generate(hf if model == "tiny-marian" else hf_separate, texts, beams)
    assert [t.hypotheses[0].text for t in reply.translations] == expected
    default = stub.Translate(pb.TranslateRequest(texts=["I love cats."]))  # the other model, unchanged
    assert default.translations[0].hypotheses[0].text == "J'aime les chats."


def test_a_request_without_options_gets_the_checkpoint_generation_defaults(
    stub: pb_grpc.TranslatorStub, hf: HF, tiny_corpus: dict[str, list[tuple[str, str]]]
) -> None:
    """No strategy and no length limit: Transformers' generate() as the checkpoint ships it (beam
    4, max_length 16, the forced end token), not this server's greedy default."""
    texts = [en for en, _ in tiny_corpus["test"][:16]]
    reply = stub.Translate(pb.TranslateRequest(texts=texts, options=pb.TranslateOptions(model="tiny-marian")))
    tokenizer, model = hf
    with torch.no_grad():
        out = model.generate(**tokenizer(texts, return_tensors="pt", padding=True))
    assert model.generation_config.num_beams == GENERATION_BEAMS > 1
    assert [t.text for t in reply.translations] == tokenizer.batch_decode(out, skip_special_tokens=True)


def test_stream_and_n_best_work(stub: pb_grpc.TranslatorStub, tiny_corpus) -> None:
    text = tiny_corpus["test"][0][0]
    stopping = pb.StoppingCriteria(max_output_tokens=MAX_NEW)
    # a stream is greedy: the same as a greedy Translate (one without a strategy gets the
    # checkpoint's beam search)
    greedy = pb.TranslateOptions(model="tiny-marian", stopping=stopping, greedy=pb.Greedy())
    unary = stub.Translate(pb.TranslateRequest(texts=[text], options=greedy))
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


def test_cross_attention_equals_transformers(stub: pb_grpc.TranslatorStub, hf, tiny_corpus) -> None:
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


# --- a multilingual model ----------------------------------------------------------------------------


def _nllb_options(**fields: object) -> pb.TranslateOptions:
    return pb.TranslateOptions(
        model="tiny-nllb", stopping=pb.StoppingCriteria(max_output_tokens=MAX_NEW), **fields
    )


def test_nllb_lists_its_languages(stub: pb_grpc.TranslatorStub) -> None:
    info = stub.GetModelInfo(pb.GetModelInfoRequest())
    (nllb,) = [m for m in info.models if m.name == "tiny-nllb"]
    assert list(nllb.languages) == list(NLLB_LANGUAGES)
    assert (nllb.source_language, nllb.target_language) == ("eng_Latn", "")
    (default,) = [m for m in info.models if m.name == "en-fr-small"]
    assert not default.languages and (default.source_language, default.target_language) == ("en", "fr")


def test_nllb_translations_per_target_language_equal_transformers(
    stub: pb_grpc.TranslatorStub, nllb_checkpoint: Path, tiny_corpus
) -> None:
    from tests.export.import_hf.test_nllb import _generate

    texts = [en for en, _ in tiny_corpus["test"][:8]]
    tokenizer = NllbTokenizer.from_pretrained(nllb_checkpoint)
    for language in ("fra_Latn", "deu_Latn"):
        reply = stub.Translate(
            pb.TranslateRequest(texts=texts, options=_nllb_options(target_language=language))
        )
        expected = _generate(nllb_checkpoint, texts, [language] * len(texts), 1)
        assert [t.text for t in reply.translations] == tokenizer.batch_decode(
            expected, skip_special_tokens=True
        )


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({}, "target_language is required by this multilingual model: eng_Latn, fra_Latn, deu_Latn"),
        ({"target_language": "xx_Yyyy"}, "target_language 'xx_Yyyy' is not one of the model's languages"),
        ({"target_language": "fra_Latn", "source_language": "x" * 5000}, "source_language 'xxxxx"),
    ],
)
def test_bad_languages_are_refused_naming_the_field(
    stub: pb_grpc.TranslatorStub, fields: dict[str, str], message: str
) -> None:
    with pytest.raises(grpc.RpcError) as err:
        stub.Translate(pb.TranslateRequest(texts=["The cat."], options=_nllb_options(**fields)))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in err.value.details() and len(err.value.details()) < 400


def test_a_bilingual_model_refuses_another_pair(stub: pb_grpc.TranslatorStub) -> None:
    ok = stub.Translate(
        pb.TranslateRequest(
            texts=["I love cats."], options=pb.TranslateOptions(source_language="en", target_language="fr")
        )
    )
    assert ok.translations[0].text == "J'aime les chats."
    with pytest.raises(grpc.RpcError) as err:
        stub.Translate(
            pb.TranslateRequest(texts=["I love cats."], options=pb.TranslateOptions(target_language="de"))
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "translates en → fr only, not en → de" in err.value.details()


def test_nllb_stream_and_attend(stub: pb_grpc.TranslatorStub, nllb_checkpoint: Path, tiny_corpus) -> None:
    text, french = tiny_corpus["test"][2]
    unary = stub.Translate(
        pb.TranslateRequest(texts=[text], options=_nllb_options(target_language="fra_Latn"))
    )
    stream = list(
        stub.TranslateStream(
            pb.TranslateStreamRequest(text=text, options=_nllb_options(target_language="fra_Latn"))
        )
    )
    assert "".join(m.delta.text for m in stream[:-1]) == unary.translations[0].text

    reply = stub.Attend(
        pb.AttendRequest(
            model="tiny-nllb", source=text, target=french, target_language="fra_Latn", layers=[1], heads=[2]
        )
    )
    tokenizer = NllbTokenizer.from_pretrained(nllb_checkpoint, src_lang="eng_Latn", tgt_lang="fra_Latn")
    model = M2M100ForConditionalGeneration.from_pretrained(
        nllb_checkpoint, attn_implementation="eager"
    ).eval()
    labels = tokenizer(text_target=french)["input_ids"]  # language token, target ids, end token
    decoder_input = torch.tensor([[model.config.decoder_start_token_id, *labels[:-1]]])
    with torch.no_grad():
        out = model(
            **tokenizer(text, return_tensors="pt"), decoder_input_ids=decoder_input, output_attentions=True
        )
    (matrix,) = reply.matrices
    got = np.array(matrix.values, dtype=np.float32).reshape(matrix.rows, matrix.cols)
    np.testing.assert_allclose(got, out.cross_attentions[1][0, 2].numpy(), atol=1e-4)


def test_the_cli_names_languages(stub_target: str, capsys: pytest.CaptureFixture[str], tiny_corpus) -> None:
    from service.client.cli import main

    assert main(["--address", stub_target, "info"]) == 0
    info = capsys.readouterr().out
    assert "tiny-nllb 1.0.0: multilingual, 3 languages (source default eng_Latn)" in info
    assert "languages: eng_Latn fra_Latn deu_Latn" in info
    text = tiny_corpus["test"][0][0]
    argv = ["--address", stub_target, "translate", "--model", "tiny-nllb", "--max-tokens", str(MAX_NEW)]
    assert main([*argv, "--target-language", "fra_Latn", text]) == 0
    assert capsys.readouterr().out.strip()
    assert main([*argv, text]) == 1
    assert "INVALID_ARGUMENT: target_language is required" in capsys.readouterr().err
