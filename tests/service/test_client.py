"""The client library and the CLI against the real server on a loopback port (the committed model)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from service.cli import display_token
from service.client import TranslatorClient, TranslatorError
from tests.service.server_fixture import ServerThread, loopback_config

ROOT = Path(__file__).resolve().parents[2]
CATS = "I love cats."
TEXTS = [CATS, "The old man gives the red book to the child.", "We see a small dog."]


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    with ServerThread(loopback_config()) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: ServerThread) -> Iterator[TranslatorClient]:
    with TranslatorClient(server.target, timeout=30) as client:
        yield client


def cli(server: ServerThread, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "service.cli", "--address", server.target, *args]
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    return subprocess.run(command, input=stdin, capture_output=True, text=True, cwd=ROOT, env=env, timeout=60)


# --- the client ------------------------------------------------------------------------------------


def test_translate_single_and_multi(client: TranslatorClient) -> None:
    (single,) = client.translate([CATS])
    multi = client.translate(TEXTS, return_timings=True)

    assert single.text == "J'aime les chats." == multi[0].text
    assert single.finish_reason == "END_OF_SEQUENCE" and single.model == "en-fr-small"
    assert single.timings is None and multi[0].timings is not None and multi[0].timings.total_seconds > 0
    assert len(multi) == 3 and all(t.text for t in multi)
    (hyp,) = single.hypotheses
    assert hyp.text == single.text and hyp.score < 0


def test_calls_are_balanced_over_every_address_of_the_target(server: ServerThread) -> None:
    """round_robin in the service config: with two servers behind one target, both get calls."""
    with ServerThread(loopback_config()) as second:
        target = f"ipv4:127.0.0.1:{server.running.port},127.0.0.1:{second.running.port}"
        before = [s.running.scheduler.stats().outcomes for s in (server, second)]
        with TranslatorClient(target, timeout=30) as balanced:
            for _ in range(6):
                assert balanced.translate([CATS])[0].text == "J'aime les chats."
        served = [
            s.running.scheduler.stats().outcomes - b for s, b in zip((server, second), before, strict=True)
        ]
        assert sum(served) == 6 and min(served) >= 2, served


def test_beam_search_n_best(client: TranslatorClient) -> None:
    (t,) = client.translate(TEXTS[2:], beam_size=4, n_best=3, return_tokens=True)

    assert len(t.hypotheses) == 3 and t.hypotheses[0].text == t.text
    ranks = [h.normalized_score for h in t.hypotheses]
    assert ranks == sorted(ranks, reverse=True)
    assert t.hypotheses[0].tokens[-1].piece == "</s>" and len(t.hypotheses[0].tokens) == t.output_tokens


def test_stream_deltas_join_to_the_unary_text(client: TranslatorClient) -> None:
    (unary,) = client.translate(TEXTS[1:2])
    stream = client.translate_stream(TEXTS[1])
    deltas = list(stream)

    assert len(deltas) > 1 and "".join(deltas) == unary.text
    assert stream.result is not None and stream.result.text == unary.text


def test_sampling_with_a_seed_is_reproducible(client: TranslatorClient) -> None:
    first = client.translate(TEXTS, sample=True, temperature=0.8, seed=7)
    again = client.translate(TEXTS, sample=True, temperature=0.8, seed=7)

    assert [t.text for t in first] == [t.text for t in again] and first[0].seed == 7


def test_attend_rows_sum_to_one_and_the_alignment_maps_each_target_token(client: TranslatorClient) -> None:
    a = client.attend(CATS, kinds=("cross", "encoder"), layers=(2,), heads=(1,))

    assert a.target == "J'aime les chats." and a.source_tokens[-1] == a.target_tokens[-1] == "</s>"
    assert set(a.matrices) == {("cross", 2, 1), ("cross", 2, None), ("encoder", 2, 1), ("encoder", 2, None)}
    cross = a.matrices["cross", 2, None]
    assert cross.shape == (len(a.target_tokens), len(a.source_tokens))
    for matrix in a.matrices.values():
        np.testing.assert_allclose(matrix.sum(axis=1), 1.0, atol=1e-3)
    assert len(a.alignment) == len(a.target_tokens)
    assert list(a.alignment) == cross.argmax(axis=1).tolist()


def test_model_info_and_health(client: TranslatorClient) -> None:
    (info,) = client.model_info()

    assert (info.name, info.default, info.source_language, info.target_language) == (
        "en-fr-small",
        True,
        "en",
        "fr",
    )
    assert info.decoder_layers == 3 and info.heads == 4 and info.max_beam_size >= 4
    assert client.health() == "SERVING" == client.health("translator.v1.Translator")


def test_errors_surface_as_translator_error(client: TranslatorClient) -> None:
    with pytest.raises(TranslatorError) as info:
        client.translate([CATS], beam_size=99)
    assert info.value.code == "INVALID_ARGUMENT" and "beam_size" in info.value.message
    assert info.value.request_id and info.value.request_id in str(info.value)  # to quote in a bug report

    with pytest.raises(TranslatorError) as info:
        list(client.translate_stream(CATS, n_best=2))
    assert info.value.code == "INVALID_ARGUMENT"


def test_display_token() -> None:
    assert [display_token(p) for p in ["Ġchats", "ats", "</s>", "ĠÃ©t"]] == ["▁chats", "ats", "</s>", "▁ét"]


# --- the CLI ---------------------------------------------------------------------------------------


def test_cli_translate_arguments_and_stdin(server: ServerThread) -> None:
    single = cli(server, "translate", CATS)
    lines = cli(server, "translate", "--batch-size", "2", stdin=f"{CATS}\n\n{TEXTS[2]}\n")

    assert (single.returncode, single.stdout) == (0, "J'aime les chats.\n")
    assert lines.returncode == 0
    assert lines.stdout.split("\n") == ["J'aime les chats.", "", "Nous voyons un petit chien.", ""]


def test_cli_stream(server: ServerThread) -> None:
    run = cli(server, "translate", "--stream", CATS)

    assert (run.returncode, run.stdout) == (0, "J'aime les chats.\n")


def test_cli_attend_prints_the_alignment_and_writes_a_png(server: ServerThread, tmp_path: Path) -> None:
    from PIL import Image

    png = tmp_path / "cats.png"
    run = cli(server, "attend", CATS, "--png", str(png))

    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert len(lines) == 9 and lines[0] == "J → I" and lines[-1] == "</s> → </s>"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as image:
        assert image.format == "PNG" and image.width > 7 * 30 and image.height > 9 * 30


def test_cli_bad_request_exits_1_with_the_status(server: ServerThread) -> None:
    run = cli(server, "translate", "--beam-size", "99", CATS)

    assert run.returncode == 1 and run.stdout == ""
    assert "INVALID_ARGUMENT" in run.stderr and "beam_size" in run.stderr
    assert cli(server, "attend").returncode == 2
