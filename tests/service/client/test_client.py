"""The client library and the CLI against the real server on a loopback port (the committed model)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from service.client import TranslateOptions, TranslatorClient, TranslatorError
from service.client.cli import _options, build_parser, display_token
from service.config import SecurityConfig
from tests.service.certs import Pki, write_pki
from tests.service.server_fixture import ServerThread, loopback_config

ROOT = Path(__file__).resolve().parents[3]
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


def cli(
    server: ServerThread, *args: str, stdin: str = "", env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "service.client", "--address", server.target, *args]
    env = (
        {k: v for k, v in os.environ.items() if k != "TRANSLATOR_TOKEN"}
        | {"PYTHONPATH": str(ROOT)}
        | (env or {})
    )
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


def test_a_paragraph_comes_back_with_its_spacing_unless_split_is_off(client: TranslatorClient) -> None:
    paragraph = f"{CATS}  {TEXTS[2]}\n"
    (t,) = client.translate([paragraph])
    assert t.text == "J'aime les chats.  Nous voyons un petit chien.\n"
    assert "".join(client.translate_stream(paragraph)) == t.text

    (whole,) = client.translate([paragraph], no_sentence_split=True)
    assert whole.text != t.text  # the text as one sequence, as before the server split texts
    assert TranslateOptions(no_sentence_split=True).to_proto().no_sentence_split


def test_sampling_with_a_seed_is_reproducible(client: TranslatorClient) -> None:
    first = client.translate(TEXTS, sample=True, temperature=0.8, seed=7)
    again = client.translate(TEXTS, sample=True, temperature=0.8, seed=7)

    assert [t.text for t in first] == [t.text for t in again] and first[0].seed == 7


def test_options_as_a_dataclass_or_keywords_send_the_same(client: TranslatorClient) -> None:
    """`options` and keyword overrides of its fields are one request; an unknown name is refused."""
    beam = TranslateOptions(beam_size=4, n_best=2)
    by_object = client.translate(TEXTS[2:], beam)
    assert client.translate(TEXTS[2:], beam_size=4, n_best=2) == by_object
    (t,) = client.translate(TEXTS[2:], beam, n_best=3)  # beam_size 4 kept, n_best replaced
    assert len(t.hypotheses) == 3 and beam.n_best == 2
    stream = client.translate_stream(CATS, TranslateOptions(max_output_tokens=3))
    text = "".join(stream)
    assert stream.result and (stream.result.output_tokens, stream.result.finish_reason) == (3, "LENGTH")
    assert text == stream.result.text and "J'aime les chats.".startswith(text)
    with pytest.raises(TypeError, match="beam"):
        client.translate([CATS], beam=4)


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


def test_attend_reports_each_sentence_of_the_source(client: TranslatorClient) -> None:
    a = client.attend(f"{CATS} {TEXTS[2]}", kinds=("cross",), layers=(2,))

    assert a.target == "J'aime les chats. Nous voyons un petit chien."
    assert not (a.matrices or a.alignment or a.source_tokens)
    first, second = a.sentences
    assert (first.source, first.target, second.source) == (CATS, "J'aime les chats.", TEXTS[2])
    alone = client.attend(CATS, kinds=("cross",), layers=(2,))
    assert alone.sentences == () and alone.source == CATS
    assert first.alignment == alone.alignment
    np.testing.assert_array_equal(first.matrices["cross", 2, None], alone.matrices["cross", 2, None])
    whole = client.attend(f"{CATS} {TEXTS[2]}", no_sentence_split=True)
    assert not whole.sentences and whole.alignment


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

    with pytest.raises(TranslatorError) as info:  # sent as asked, not quietly decoded greedily
        list(client.translate_stream(CATS, beam_size=4))
    assert info.value.code == "INVALID_ARGUMENT" and "beam_size 4" in info.value.message


def test_beam_size_0_is_the_protos_default_beam_of_4(client: TranslatorClient) -> None:
    """The proto: BeamSearch.beam_size 0 means 4; only 1 is greedy. The library sends 0 as given."""
    assert TranslateOptions(beam_size=0).to_proto().WhichOneof("strategy") == "beam"
    assert TranslateOptions(beam_size=1).to_proto().WhichOneof("strategy") == "greedy"

    default = client.translate(TEXTS, beam_size=0, n_best=4)
    four = client.translate(TEXTS, beam_size=4, n_best=4)
    assert [[(h.text, h.score) for h in t.hypotheses] for t in default] == [
        [(h.text, h.score) for h in t.hypotheses] for t in four
    ]
    assert all(len(t.hypotheses) == 4 for t in default)  # greedy would have refused n_best 4
    with pytest.raises(TranslatorError) as info:  # the default beam is 4: no room for 5 hypotheses
        client.translate([CATS], beam_size=0, n_best=5)
    assert "beam size 4" in info.value.message
    with pytest.raises(ValueError, match="exclude each other"):
        client.translate([CATS], beam_size=0, sample=True)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"max_output_tokens": -1}, "max_output_tokens must be between 0 and 4294967295, got -1"),
        ({"beam_size": 2**32}, "beam_size must be between 0 and 4294967295, got 4294967296"),
        ({"sample": True, "seed": -1}, "seed must be between 0 and 18446744073709551615, got -1"),
        ({"sample": True, "seed": 2**64}, "seed must be between 0 and 18446744073709551615"),
        ({"sample": True, "top_k": -3}, "top_k must be between 0 and 4294967295, got -3"),
    ],
)
def test_options_out_of_their_fields_range_name_the_option(
    client: TranslatorClient, options: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError) as info:
        client.translate([CATS], **options)
    assert message in str(info.value)
    with pytest.raises(ValueError, match=message):  # refused when made, before any call
        TranslateOptions(**options)  # type: ignore[arg-type]


def test_attend_refuses_negative_layers_and_heads(client: TranslatorClient) -> None:
    with pytest.raises(ValueError, match="layers entry must be between 0 and 4294967295, got -1"):
        client.attend(CATS, layers=(-1,))
    with pytest.raises(ValueError, match="heads entry must be between 0 and 4294967295, got -2"):
        client.attend(CATS, heads=(-2,))


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


CUT = "python -m service.client: translation {} was cut at the output limit (finish_reason LENGTH)\n"


def test_cli_says_on_stderr_when_a_translation_was_cut_short(server: ServerThread) -> None:
    run = cli(server, "translate", "--max-tokens", "3", CATS)
    assert (run.returncode, run.stdout, run.stderr) == (0, "J'a\n", CUT.format(1))

    # numbered as the input lines, blank ones counted; a text is cut when any of its sentences is
    run = cli(server, "translate", "--max-tokens", "9", stdin=f"\n{CATS}\n{CATS} {TEXTS[1]}\n")
    assert run.returncode == 0 and run.stdout.splitlines()[1] == "J'aime les chats."
    assert run.stderr == CUT.format(3)

    run = cli(server, "translate", "--stream", "--max-tokens", "3", "", CATS)
    assert (run.returncode, run.stdout, run.stderr) == (0, "\nJ'a\n", CUT.format(2))

    timed = cli(server, "translate", "--timings", "--max-tokens", "3", CATS)
    assert "3 tokens, finish_reason LENGTH\n" in timed.stderr and timed.stderr.endswith(CUT.format(1))
    assert cli(server, "translate", "--timings", CATS).stderr.endswith("finish_reason END_OF_SEQUENCE\n")


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


def test_cli_attend_reports_each_sentence_and_writes_a_png_each(server: ServerThread, tmp_path: Path) -> None:
    png = tmp_path / "pair.png"
    run = cli(server, "attend", f"{CATS}\n{TEXTS[2]}", "--png", str(png))

    assert run.returncode == 0, run.stderr
    first, second = run.stdout.split("\n\n")
    assert first.splitlines()[0] == "# sentence 1: I love cats. → J'aime les chats."
    assert first.splitlines()[1:] == cli(server, "attend", CATS).stdout.splitlines()
    assert second.startswith("# sentence 2: We see a small dog. → Nous voyons un petit chien.\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pair-1.png", "pair-2.png"]
    whole = cli(server, "attend", "--no-split", f"{CATS} {TEXTS[2]}")
    assert whole.returncode == 0 and "#" not in whole.stdout


def test_cli_bad_request_exits_1_with_the_status(server: ServerThread) -> None:
    run = cli(server, "translate", "--beam-size", "99", CATS)

    assert run.returncode == 1 and run.stdout == ""
    assert "INVALID_ARGUMENT" in run.stderr and "beam_size" in run.stderr
    assert cli(server, "attend").returncode == 2


def test_cli_stream_refuses_beam_search_with_the_servers_status(server: ServerThread) -> None:
    """--stream passes --beam-size and --n-best on: the server says why it cannot, and nothing is
    decoded in a way the user did not ask for."""
    for args, said in [
        (("--beam-size", "4"), "beam_size 4"),
        (("--beam-size", "9"), "beam_size 9 is over the limit of 8"),
        (("--n-best", "3"), "n_best 3"),
    ]:
        run = cli(server, "translate", "--stream", *args, CATS)
        assert (run.returncode, run.stdout) == (1, ""), (args, run.stdout)
        assert "error: INVALID_ARGUMENT" in run.stderr and said in run.stderr, (args, run.stderr)
    assert cli(server, "translate", "--stream", "--beam-size", "1", CATS).stdout == "J'aime les chats.\n"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["translate", "--beam-size", "0"], "argument --beam-size: must be at least 1, got 0"),
        (["translate", "--n-best", "0"], "argument --n-best: must be at least 1, got 0"),
        (["translate", "--max-tokens", "-1"], "argument --max-tokens: must be at least 0, got -1"),
        (["translate", "--min-tokens", "-1"], "argument --min-tokens: must be at least 0, got -1"),
        (["translate", "--top-k", "-1"], "argument --top-k: must be at least 0, got -1"),
        (["translate", "--seed", "-1"], "argument --seed: must be at least 0, got -1"),
        (["translate", "--seed", str(2**64)], "argument --seed: must be at most 18446744073709551615"),
        (["translate", "--beam-size", str(2**32)], "argument --beam-size: must be at most 4294967295"),
        (["translate", "--batch-size", "0"], "argument --batch-size: must be at least 1, got 0"),
        (["translate", "--top-k", "two"], "argument --top-k: not an integer: 'two'"),
        (["attend", "x", "--layer", "-1"], "argument --layer: must be at least 0, got -1"),
        (["attend", "x", "--head", "-1"], "argument --head: must be at least 0, got -1"),
    ],
)
def test_cli_integers_out_of_range_name_the_flag_and_the_range(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(argv)
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_cli_flags_build_the_translate_options() -> None:
    """Each option flag sets its TranslateOptions field; unset flags keep the dataclass's defaults."""
    args = build_parser().parse_args(["translate", "x"])
    assert _options(args) == TranslateOptions()
    argv = ["--beam-size", "4", "--n-best", "2", "--max-tokens", "9", "--min-tokens", "1", "--prefix", "Le"]
    argv += ["--model", "m", "--timings", "--temperature", "0.5", "--top-k", "3", "--top-p", "0.9"]
    argv += ["--no-split"]
    expected = TranslateOptions(
        beam_size=4,
        n_best=2,
        max_output_tokens=9,
        min_output_tokens=1,
        target_prefix="Le",
        model="m",
        return_timings=True,
        temperature=0.5,
        top_k=3,
        top_p=0.9,
        no_sentence_split=True,
    )
    assert _options(build_parser().parse_args(["translate", *argv, "x"])) == expected
    sampled = build_parser().parse_args(["translate", "--sample", "--seed", "7", "x"])
    assert _options(sampled) == TranslateOptions(sample=True, seed=7)


def test_cli_out_of_range_integer_exits_2_before_calling(server: ServerThread) -> None:
    run = cli(server, "translate", "--max-tokens", "-1", CATS)

    assert (run.returncode, run.stdout) == (2, "")
    assert (
        "argument --max-tokens: must be at least 0, got -1" in run.stderr and "Value out of" not in run.stderr
    )


def test_cli_batch_size_over_the_servers_limit_is_capped_to_it(server: ServerThread) -> None:
    """The server takes at most 64 texts per call; 72 lines with --batch-size 100 become 2 calls."""
    lines = [TEXTS[i % 3] if i % 30 else "" for i in range(72)]  # 69 texts, 3 blank lines
    assert sum(map(bool, lines)) > 64
    run = cli(server, "translate", "--batch-size", "100", stdin="\n".join(lines) + "\n")

    assert run.returncode == 0, run.stderr
    expected = {CATS: "J'aime les chats.", TEXTS[2]: "Nous voyons un petit chien.", "": ""}
    out = run.stdout.split("\n")
    assert len(out) == 73 and out[-1] == ""
    assert all(out[i] == expected[line] for i, line in enumerate(lines) if line in expected)
    assert all(out[i] for i, line in enumerate(lines) if line)


def test_cli_blank_texts_give_blank_lines_as_arguments_stdin_and_streams(server: ServerThread) -> None:
    """One output line per input text, whatever the mode: a blank text (empty or spaces) is not
    sent (the server requires non-empty texts) and prints an empty line, exit 0."""
    expected = (0, "\nJ'aime les chats.\n\n")
    for mode in ((), ("--stream",)):
        run = cli(server, "translate", *mode, "", CATS, "  ")
        assert (run.returncode, run.stdout) == expected, (mode, run.stderr)
        run = cli(server, "translate", *mode, stdin=f"\n{CATS}\n  \n")
        assert (run.returncode, run.stdout) == expected, (mode, run.stderr)


# --- TLS and tokens ---------------------------------------------------------------------------------

TOKEN = "client-test-token-0123456789"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return write_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def secure(server: ServerThread, pki: Pki) -> Iterator[ServerThread]:
    """Mutual TLS and a bearer token, on the engine of `server`."""
    security = SecurityConfig(
        tls_cert=pki.server_cert, tls_key=pki.server_key, tls_client_ca=pki.ca, auth_tokens=(TOKEN,)
    )
    with ServerThread(replace(loopback_config(), security=security), server.running.engine) as running:
        yield running


def test_the_client_speaks_mutual_tls_and_sends_its_token(secure: ServerThread, pki: Pki) -> None:
    tls = {"tls_ca": pki.ca, "tls_cert": pki.client_cert, "tls_key": pki.client_key}
    with TranslatorClient(secure.target, timeout=30, token=TOKEN, **tls) as client:
        assert client.translate([CATS])[0].text == "J'aime les chats."
        assert "".join(client.translate_stream(CATS)) == "J'aime les chats."
        assert client.model_info()[0].name == "en-fr-small"
    with TranslatorClient(secure.target, timeout=30, **tls) as anonymous:
        assert anonymous.health() == "SERVING"  # health needs no token
        with pytest.raises(TranslatorError) as err:
            anonymous.translate([CATS])
        assert err.value.code == "UNAUTHENTICATED"
        with pytest.raises(TranslatorError) as err:
            list(anonymous.translate_stream(CATS))
        assert err.value.code == "UNAUTHENTICATED"
    with pytest.raises(ValueError, match="tls_cert and tls_key go together"):
        TranslatorClient(secure.target, tls_cert=pki.client_cert)


def test_cli_tls_flags_and_token_from_flag_or_environment(secure: ServerThread, pki: Pki) -> None:
    tls = ["--tls-ca", str(pki.ca), "--tls-cert", str(pki.client_cert), "--tls-key", str(pki.client_key)]
    by_env = cli(secure, *tls, "translate", CATS, env={"TRANSLATOR_TOKEN": TOKEN})
    assert (by_env.returncode, by_env.stdout) == (0, "J'aime les chats.\n"), by_env.stderr
    by_flag = cli(secure, *tls, "--token", TOKEN, "translate", "--stream", CATS)
    assert (by_flag.returncode, by_flag.stdout) == (0, "J'aime les chats.\n"), by_flag.stderr
    missing = cli(secure, *tls, "translate", CATS)
    assert missing.returncode == 1 and missing.stderr.startswith(
        "error: UNAUTHENTICATED: missing bearer token"
    )
    plaintext = cli(secure, "--token", TOKEN, "translate", CATS)
    assert plaintext.returncode == 1 and plaintext.stderr.startswith("error: UNAVAILABLE")
    unreadable = cli(secure, "--tls-ca", str(pki.ca.parent / "missing.crt"), "health")
    assert unreadable.returncode == 1 and "missing.crt: No such file" in unreadable.stderr
