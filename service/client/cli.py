"""`python -m service.client [--address HOST:PORT] {translate,attend,info,health}`: the client on a terminal.

    python -m service.client translate "I love cats."            # J'aime les chats.
    printf 'I love cats.\\n\\nWe see a dog.\\n' | python -m service.client translate
    python -m service.client translate --stream "I love cats."
    python -m service.client attend "I love cats." --png cats.png

A blank TEXT (empty or only spaces), given as an argument or as a stdin line, prints an empty line
and sends nothing, so that output line i is always the translation of input i (one line per text
unless --n-best > 1). The server translates a text sentence by sentence (--no-split: whole). A
translation cut short at the output limit (--max-tokens, or the server's default; finish_reason
LENGTH, for any of its sentences) is printed all the same, with a note on stderr naming its input
number. --stream sends the decoding options as given: the server refuses beam search and
--n-best > 1 for streams, and that error is shown.

TLS: --tls (the system's CAs) or --tls-ca FILE; mutual TLS adds --tls-cert and --tls-key. A bearer
token comes from --token or, kept out of `ps`, the environment variable TRANSLATOR_TOKEN.

Errors print "error: STATUS: message" on stderr and exit 1; usage errors (an option out of range
included) exit 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any, NamedTuple, get_args, get_type_hints

from service.client.client import (
    ATTENTION_KINDS,
    UINT32_MAX,
    Attention,
    TranslateOptions,
    Translation,
    TranslatorClient,
    TranslatorError,
)

DEFAULT_ADDRESS = "localhost:50051"
PROG = "python -m service.client"
TOKEN_ENV = "TRANSLATOR_TOKEN"


def int_range(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer from `low` to `high` (None: no upper bound).

    The options map to unsigned proto fields, which protobuf refuses with "Value out of range: -1",
    naming neither the option nor the range; argparse prefixes this error with the flag instead.
    """

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"must be at most {high}, got {value}")
        return value

    return parse


# --- token display ---------------------------------------------------------------------------------


def _byte_decoder() -> dict[str, int]:
    """Byte-level BPE's printable stand-ins → the bytes they stand for (the GPT-2 byte table)."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {chr(b): b for b in kept}
    moved = [b for b in range(256) if b not in table.values()]
    table |= {chr(256 + i): b for i, b in enumerate(moved)}
    return table


_BYTES = _byte_decoder()


def display_token(piece: str) -> str:
    """A vocabulary piece made readable: its bytes decoded as UTF-8, a leading space shown as '▁'.

    Special tokens ("</s>") and pieces that are not byte-level spellings are returned as they are.
    """
    if not piece or any(ch not in _BYTES for ch in piece) or piece.startswith("</"):
        return piece
    text = bytes(_BYTES[ch] for ch in piece).decode("utf-8", errors="replace")
    return "▁" + text[1:] if text.startswith(" ") else text


# --- translate -------------------------------------------------------------------------------------


class Flag(NamedTuple):
    """A translate flag that sets a TranslateOptions field; `low` raises an unsigned field's least value."""

    flag: str
    help: str
    low: int = 0


# Keyed by the field the flag sets (its dest), in --help order; default, type and range come from
# the field. A field without a flag keeps its default.
OPTION_FLAGS = {
    "beam_size": Flag(
        "--beam-size", "beam width (1: greedy; default: the model's, greedy unless it ships one)", low=1
    ),
    "n_best": Flag("--n-best", "hypotheses per text, 'score<TAB>text' lines", low=1),
    "sample": Flag("--sample", "sample instead of searching"),
    "temperature": Flag("--temperature", "sampling temperature (%(default)s)"),
    "top_k": Flag("--top-k", "sample among the k best tokens (0: off)"),
    "top_p": Flag("--top-p", "nucleus sampling mass (1.0: off)"),
    "seed": Flag("--seed", "sampling seed (default: the server's)"),
    "max_output_tokens": Flag("--max-tokens", "generated-token limit (0: default)"),
    "min_output_tokens": Flag("--min-tokens", "tokens before the end (0: none)"),
    "target_prefix": Flag("--prefix", "text the translation must start with"),
    "model": Flag("--model", "model name (default: the server's default)"),
    "source_language": Flag("--source-language", "source language code (see info)"),
    "target_language": Flag("--target-language", "target language code (a multilingual model needs it)"),
    "return_timings": Flag("--timings", "print timings and the finish reason on stderr"),
    "no_sentence_split": Flag("--no-split", "translate each text whole, not sentence by sentence"),
}


def _add_option_flags(parser: argparse.ArgumentParser) -> None:
    fields_ = {f.name: f for f in fields(TranslateOptions)}
    hints = get_type_hints(TranslateOptions)
    for name, (flag, help_, low) in OPTION_FLAGS.items():
        field, hint = fields_[name], hints[name]
        kwargs: dict[str, Any] = {"dest": name, "default": field.default, "help": help_}
        if hint is bool:
            kwargs["action"] = "store_true"
        else:  # the metavar argparse gives a flag by its own name, not the field's
            kwargs["metavar"] = flag.removeprefix("--").replace("-", "_").upper()
            if "max" in field.metadata:
                kwargs["type"] = int_range(low, field.metadata["max"])
            elif float in (hint, *get_args(hint)):
                kwargs["type"] = float
        parser.add_argument(flag, **kwargs)


def _options(args: argparse.Namespace) -> TranslateOptions:
    # beam_size and n_best go to streams too: the server refuses them there with a status that
    # says why, where leaving them out would quietly decode greedily instead of what was asked.
    return TranslateOptions(**{name: getattr(args, name) for name in OPTION_FLAGS})


def _batches(lines: Iterable[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for line in lines:
        batch.append(line.rstrip("\r\n"))
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _print_translation(t: Translation, n_best: int, number: int) -> None:
    if n_best > 1:  # every hypothesis on its own line, best first, with its ranking score
        for h in t.hypotheses:
            print(f"{h.normalized_score:.4f}\t{h.text}")
    else:
        print(t.text)
    _print_notes(t, number)


def _print_notes(t: Translation, number: int) -> None:
    """On stderr, so that stdout stays one translation per line: the timings when asked for, and a
    note when the translation was cut at the output limit (which its text alone does not show)."""
    if t.timings is not None:
        x = t.timings
        print(
            f"timings: queue {x.queue_seconds * 1e3:.1f} ms, first token "
            f"{x.time_to_first_token_seconds * 1e3:.1f} ms, decode {x.decode_seconds * 1e3:.1f} ms, "
            f"total {x.total_seconds * 1e3:.1f} ms, {t.output_tokens} tokens, finish_reason "
            f"{t.finish_reason}",
            file=sys.stderr,
        )
    if t.finish_reason == "LENGTH":
        print(
            f"{PROG}: translation {number} was cut at the output limit (finish_reason LENGTH)",
            file=sys.stderr,
        )


def _translate_batch(
    client: TranslatorClient, texts: list[str], args: argparse.Namespace, first: int
) -> None:
    """Translates a batch, empty (blank) lines giving empty lines, and prints it in order; `first`
    is the input number of texts[0] (from 1, blank texts counted)."""
    todo = [t for t in texts if t.strip()]
    done = iter(client.translate(todo, _options(args)) if todo else [])
    for number, text in enumerate(texts, first):
        if text.strip():
            _print_translation(next(done), args.n_best, number)
        else:
            print()
    sys.stdout.flush()


def _stream_one(client: TranslatorClient, text: str, args: argparse.Namespace, number: int) -> None:
    stream = client.translate_stream(text, _options(args)) if text.strip() else None
    for delta in stream or ():
        sys.stdout.write(delta)
        sys.stdout.flush()
    print(flush=True)
    if stream is not None and stream.result is not None:
        _print_notes(stream.result, number)


def _max_texts(client: TranslatorClient, model: str) -> int | None:
    """The server's texts-per-request limit for `model` ("": the default one); None when the
    server has no such model (the Translate call then reports NOT_FOUND)."""
    for m in client.model_info():
        if m.name == model or (not model and m.default):
            return m.max_texts_per_request
    return None


def cmd_translate(client: TranslatorClient, args: argparse.Namespace) -> None:
    texts: Iterable[str] = args.texts or sys.stdin
    if args.stream:
        for number, text in enumerate(texts, 1):
            _stream_one(client, text.rstrip("\r\n"), args, number)
        return
    size = args.batch_size
    # The server refuses a call with more texts than its limit (64 unless configured otherwise),
    # so a larger --batch-size is capped to the limit GetModelInfo reports: every batch size then
    # works. Not asked when no call can hold more than one text (one TEXT argument).
    if size > 1 and len(args.texts) != 1:
        limit = _max_texts(client, args.model)
        if limit:
            size = min(size, limit)
    first = 1
    for batch in _batches(texts, size):
        _translate_batch(client, batch, args, first)
        first += len(batch)


# --- attend ----------------------------------------------------------------------------------------


def cmd_attend(client: TranslatorClient, args: argparse.Namespace) -> None:
    attention = client.attend(
        args.source,
        args.target,
        kinds=[args.kind],
        layers=[] if args.layer is None else [args.layer],
        heads=[] if args.head is None else [args.head],
        average_heads=args.head is None,
        model=args.model,
        source_language=args.source_language,
        target_language=args.target_language,
        no_sentence_split=args.no_split,
    )
    if not attention.sentences:
        _print_pair(attention, args, args.png)
        return
    # a source of several sentences: one report per sentence pair, one picture each (FILE-1.png, ...)
    for k, pair in enumerate(attention.sentences, 1):
        if k > 1:
            print()
        print(f"# sentence {k}: {pair.source} → {pair.target}")
        png = Path(args.png) if args.png else None
        _print_pair(pair, args, str(png.with_stem(f"{png.stem}-{k}")) if png else None)


def _print_pair(attention: Attention, args: argparse.Namespace, png: str | None) -> None:
    """The alignment of one pair, and its heatmap written to `png` when given."""
    source = [display_token(p) for p in attention.source_tokens]
    target = [display_token(p) for p in attention.target_tokens]
    for i, j in enumerate(attention.alignment):
        print(f"{target[i]} → {source[j]}")
    if png:
        key, matrix = _chosen_matrix(attention, args)
        rows, cols = (source, source) if key[0] == "encoder" else (target, source)
        if key[0] == "decoder":  # columns are the decoder inputs: the start token, then the target
            cols = ["<s>", *target[:-1]]
        head = "head mean" if key[2] is None else f"head {key[2]}"
        title = f"{key[0]} attention, layer {key[1]}, {head}"
        write_heatmap(png, matrix, rows, cols, title=title)
        print(f"wrote {png} ({matrix.shape[0]}×{matrix.shape[1]}, {title})", file=sys.stderr)


def _chosen_matrix(attention: Attention, args: argparse.Namespace) -> tuple[Any, Any]:
    """The matrix of the requested layer (default: the last one) and head (default: the mean)."""
    keys = [k for k in attention.matrices if k[0] == args.kind and k[2] == args.head]
    key = max(keys, key=lambda k: k[1])
    return key, attention.matrices[key]


# --- the heatmap (Pillow, imported only when a picture is asked for) -------------------------------

# Anchor colours of a dark-to-bright perceptual ramp (0 → dark purple, 1 → yellow), interpolated.
_RAMP = ((68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37))
CELL, FONT_SIZE, PAD = 34, 14, 8


def ramp_colour(value: float) -> tuple[int, int, int]:
    """The colour of an attention weight in [0, 1] (clipped)."""
    x = min(max(value, 0.0), 1.0) * (len(_RAMP) - 1)
    i = min(int(x), len(_RAMP) - 2)
    f = x - i
    lo, hi = _RAMP[i], _RAMP[i + 1]
    return (
        round(lo[0] + (hi[0] - lo[0]) * f),
        round(lo[1] + (hi[1] - lo[1]) * f),
        round(lo[2] + (hi[2] - lo[2]) * f),
    )


def _font() -> tuple[Any, bool]:
    """DejaVu Sans when the system has it (accents and '▁' render), else Pillow's default font."""
    from PIL import ImageFont

    try:
        return ImageFont.truetype("DejaVuSans.ttf", FONT_SIZE), True
    except OSError:
        return ImageFont.load_default(size=FONT_SIZE), False


def _ascii_label(label: str) -> str:
    """For Pillow's default font, which lacks accents: é → e, '▁' → '_'."""
    import unicodedata

    folded = unicodedata.normalize("NFKD", label.replace("▁", "_"))
    return "".join(ch for ch in folded if ord(ch) < 128)


def write_heatmap(path: str, matrix: Any, rows: list[str], cols: list[str], *, title: str = "") -> None:
    """Writes an attention matrix as a PNG: one cell per weight, row labels on the left, column labels
    rotated on top, the weight written in cells of 0.10 or more, and a colour scale on the right.

    Args:
        path: the PNG file to write.
        matrix: (len(rows), len(cols)) weights in [0, 1].
        rows: the label of each row (query tokens).
        cols: the label of each column (key tokens).
        title: a line written above the picture.
    """
    from PIL import Image, ImageDraw

    font, unicode_ok = _font()
    if not unicode_ok:
        rows, cols, title = (
            [_ascii_label(x) for x in rows],
            [_ascii_label(x) for x in cols],
            _ascii_label(title),
        )
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def width(text: str) -> int:
        return int(measure.textlength(text, font=font))

    left = max(map(width, rows)) + 2 * PAD
    top = max(map(width, cols)) + 2 * PAD + FONT_SIZE + PAD  # rotated labels under the title
    n, m = len(rows), len(cols)
    scale_x = left + m * CELL + 2 * PAD
    image_w = max(scale_x + 16 + width("1.0") + 2 * PAD, width(title) + 2 * PAD)
    image = Image.new("RGB", (image_w, top + n * CELL + 2 * PAD), "white")
    draw = ImageDraw.Draw(image)
    draw.text((PAD, PAD), title, fill="black", font=font)
    for i in range(n):
        y = top + i * CELL
        draw.text((left - PAD, y + CELL // 2), rows[i], fill="black", font=font, anchor="rm")
        for j in range(m):
            x, value = left + j * CELL, float(matrix[i][j])
            draw.rectangle((x, y, x + CELL - 1, y + CELL - 1), fill=ramp_colour(value))
            if value >= 0.1:
                ink = "black" if value > 0.6 else "white"
                draw.text((x + CELL // 2, y + CELL // 2), f"{value:.1f}", fill=ink, font=font, anchor="mm")
    for j, label in enumerate(cols):  # each column label drawn horizontally, then turned upright
        tile = Image.new("RGB", (width(label) + 2, FONT_SIZE + 6), "white")
        ImageDraw.Draw(tile).text((0, 0), label, fill="black", font=font)
        tile = tile.rotate(90, expand=True)
        image.paste(tile, (left + j * CELL + (CELL - tile.width) // 2, top - PAD - tile.height))
    for k in range(n * CELL):  # the colour scale: 1 at the top, 0 at the bottom
        draw.line((scale_x, top + k, scale_x + 14, top + k), fill=ramp_colour(1 - k / (n * CELL - 1)))
    draw.rectangle((scale_x, top, scale_x + 14, top + n * CELL - 1), outline="black")
    draw.text((scale_x + 18, top), "1.0", fill="black", font=font)
    draw.text((scale_x + 18, top + n * CELL), "0.0", fill="black", font=font, anchor="ls")
    image.save(path, format="PNG")


# --- info, health ----------------------------------------------------------------------------------


def cmd_info(client: TranslatorClient, args: argparse.Namespace) -> None:
    for m in client.model_info():
        default = " (default)" if m.default else ""
        pair = f"{m.source_language}→{m.target_language}"
        if m.languages:  # multilingual: the default source, then every code
            pair = f"multilingual, {len(m.languages)} languages (source default {m.source_language})"
        print(f"{m.name} {m.version}{default}: {pair}, {m.variant}")
        if m.languages:
            print(f"  languages: {' '.join(m.languages)}")
        print(f"  providers: {', '.join(m.execution_providers)}")
        print(f"  layers: {m.encoder_layers} encoder + {m.decoder_layers} decoder, {m.heads} heads, ", end="")
        print(f"vocabulary {m.vocab_size}")
        print(
            f"  limits: {m.max_source_tokens} source tokens, {m.max_output_tokens} output tokens, "
            f"{m.max_texts_per_request} texts per request, beam ≤ {m.max_beam_size}"
        )


def cmd_health(client: TranslatorClient, args: argparse.Namespace) -> None:
    status = client.health(args.service)
    print(status)
    if status != "SERVING":
        raise SystemExit(1)


# --- the parser ------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="translator gRPC client")
    parser.add_argument("--address", default=DEFAULT_ADDRESS, help="server host:port (%(default)s)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per call (%(default)s)")
    parser.add_argument("--tls", action="store_true", help="speak TLS, trusting the system's CAs")
    parser.add_argument("--tls-ca", metavar="FILE", help="speak TLS, trusting this CA (PEM)")
    parser.add_argument("--tls-cert", metavar="FILE", help="mutual TLS: this client's certificate (PEM)")
    parser.add_argument("--tls-key", metavar="FILE", help="mutual TLS: this client's private key (PEM)")
    parser.add_argument("--token", help=f"bearer token sent with every call (default: env {TOKEN_ENV})")
    commands = parser.add_subparsers(dest="command", required=True)

    t = commands.add_parser("translate", help="translate texts (arguments, or one per line on stdin)")
    t.add_argument(
        "texts",
        nargs="*",
        metavar="TEXT",
        help="texts to translate (none: stdin lines); a blank one prints a blank line",
    )
    t.add_argument("--stream", action="store_true", help="print the output live (greedy or sampling)")
    _add_option_flags(t)
    t.add_argument(
        "--batch-size",
        type=int_range(1),
        default=16,
        help="stdin lines per request (%(default)s; capped to the server's texts-per-request limit)",
    )
    t.set_defaults(run=cmd_translate)

    a = commands.add_parser("attend", help="print the alignment; --png writes the attention heatmap")
    a.add_argument("source", metavar="SOURCE", help="the source text")
    a.add_argument("--target", default=None, help="target text (default: the server's translation)")
    a.add_argument("--kind", choices=sorted(ATTENTION_KINDS), default="cross", help="(%(default)s)")
    a.add_argument(
        "--layer", type=int_range(0, UINT32_MAX), default=None, help="heatmap layer (default: the last)"
    )
    a.add_argument(
        "--head", type=int_range(0, UINT32_MAX), default=None, help="heatmap head (default: the mean)"
    )
    a.add_argument(
        "--png",
        default=None,
        metavar="FILE",
        help="write the heatmap as a PNG (several sentences: FILE-1.png, FILE-2.png, ...)",
    )
    a.add_argument(
        "--no-split", action="store_true", help="attend to the source whole, not sentence by sentence"
    )
    for name in ("model", "source_language", "target_language"):
        a.add_argument(OPTION_FLAGS[name].flag, dest=name, default="", help=OPTION_FLAGS[name].help)
    a.set_defaults(run=cmd_attend)

    i = commands.add_parser("info", help="describe the loaded models")
    i.set_defaults(run=cmd_info)
    h = commands.add_parser("health", help="the server's health status (exit 1 unless SERVING)")
    h.add_argument("--service", default="", help="service name (default: the whole server)")
    h.set_defaults(run=cmd_health)
    return parser


def main(argv: list[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """The CLI; `environ` (default: the process's) gives TRANSLATOR_TOKEN when --token is not set."""
    parser = build_parser()
    args = parser.parse_args(argv)
    token = args.token or (os.environ if environ is None else environ).get(TOKEN_ENV) or None
    tls = {"tls": args.tls, "tls_ca": args.tls_ca, "tls_cert": args.tls_cert, "tls_key": args.tls_key}
    try:
        with TranslatorClient(args.address, timeout=args.timeout, token=token, **tls) as client:
            args.run(client, args)
    except TranslatorError as err:
        print(f"error: {err.code}: {err.message}", file=sys.stderr)
        return 1
    except (ValueError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except OSError as err:  # a --tls- file
        print(f"error: {err.filename}: {err.strerror}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
