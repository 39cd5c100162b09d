"""The public API: protos/translator/v1/translator.proto and the Python code `make proto` generates.

The .proto is read back through protoc (descriptors with source info), so "every element has a
comment" is checked on what protoc parsed, not on a regex of the text. The last tests start a
grpc.aio server on a loopback port with a stand-in servicer, the standard health service and
reflection: the wiring the real server uses.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from service.api import codegen
from service.api.translator.v1 import translator_pb2 as pb
from service.api.translator.v1 import translator_pb2_grpc as pb_grpc

PROTO_FILE = "translator/v1/translator.proto"
SERVICE = "translator.v1.Translator"
FDP = descriptor_pb2.FileDescriptorProto
DP = descriptor_pb2.DescriptorProto
EDP = descriptor_pb2.EnumDescriptorProto
SDP = descriptor_pb2.ServiceDescriptorProto


# --- the generated package -------------------------------------------------------------------------


def test_generated_modules_import_as_a_package_under_service_api() -> None:
    assert pb.DESCRIPTOR.name == PROTO_FILE  # the name reflection serves, free of service/api
    assert pb.DESCRIPTOR.package == "translator.v1"
    assert pb.TranslateRequest.__module__ == "service.api.translator.v1.translator_pb2"
    # The rewritten import in the grpc module reaches the same module (one registration, one class).
    assert pb_grpc.translator_dot_v1_dot_translator__pb2 is pb
    for name in ("TranslatorStub", "TranslatorServicer", "add_TranslatorServicer_to_server"):
        assert hasattr(pb_grpc, name), name
    for stub in ("translator_pb2.pyi", "translator_pb2_grpc.pyi"):  # what mypy reads
        assert (Path(pb.__file__).parent / stub).is_file(), stub


def test_the_import_rewrite_moves_modules_and_leaves_proto_names_alone() -> None:
    generated = (
        "from translator.v1 import translator_pb2 as translator_dot_v1_dot_translator__pb2\n"
        "_builder.BuildTopDescriptorsAndMessages(DESCRIPTOR, 'translator.v1.translator_pb2', _globals)\n"
        "handler = generic_handler('translator.v1.Translator', handlers)\n"
        "path = '/translator.v1.Translator/Translate'\n"
    )
    assert codegen.rewrite(generated, ["translator"], "service.api") == (
        "from service.api.translator.v1 import translator_pb2 as translator_dot_v1_dot_translator__pb2\n"
        "_builder.BuildTopDescriptorsAndMessages(DESCRIPTOR, 'service.api.translator.v1.translator_pb2', "
        "_globals)\n"
        "handler = generic_handler('translator.v1.Translator', handlers)\n"
        "path = '/translator.v1.Translator/Translate'\n"
    )
    with pytest.raises(ValueError, match="absolute `import`"):
        codegen.rewrite("import translator.v1.translator_pb2\n", ["translator"], "service.api")


def _without_json_names(file: descriptor_pb2.FileDescriptorProto) -> descriptor_pb2.FileDescriptorProto:
    """protoc's descriptor sets carry json_name, the descriptors embedded in *_pb2.py do not."""
    file = FDP.FromString(file.SerializeToString())
    messages = list(file.message_type)
    while messages:
        message = messages.pop()
        for field in message.field:
            field.ClearField("json_name")
        messages.extend(message.nested_type)
    return file


def test_generated_code_is_up_to_date_with_the_proto() -> None:
    (fresh,) = [f for f in codegen.descriptor_set().file if f.name == PROTO_FILE]
    generated = FDP.FromString(pb.DESCRIPTOR.serialized_pb)
    assert _without_json_names(fresh) == generated, "the .proto changed since `make proto`: run it"


# --- comments ------------------------------------------------------------------------------------


def uncommented(file: descriptor_pb2.FileDescriptorProto) -> list[str]:
    """Messages, fields, oneofs, enums, enum values, services and RPCs without a leading comment."""
    comments = {tuple(loc.path): loc.leading_comments.strip() for loc in file.source_code_info.location}
    missing: list[str] = []

    def check(path: tuple[int, ...], name: str) -> None:
        if not comments.get(path):
            missing.append(name)

    def enums(path: tuple[int, ...], items: list[EDP]) -> None:
        for i, enum in enumerate(items):
            check((*path, i), enum.name)
            for j, value in enumerate(enum.value):
                check((*path, i, EDP.VALUE_FIELD_NUMBER, j), value.name)

    def messages(path: tuple[int, ...], items: list[DP], prefix: str) -> None:
        for i, message in enumerate(items):
            here, name = (*path, i), f"{prefix}{message.name}"
            check(here, name)
            for j, field in enumerate(message.field):
                check((*here, DP.FIELD_FIELD_NUMBER, j), f"{name}.{field.name}")
            synthetic = {f.oneof_index for f in message.field if f.proto3_optional}  # `optional` fields
            for j, oneof in enumerate(message.oneof_decl):
                if j not in synthetic:
                    check((*here, DP.ONEOF_DECL_FIELD_NUMBER, j), f"{name}.{oneof.name}")
            messages((*here, DP.NESTED_TYPE_FIELD_NUMBER), list(message.nested_type), f"{name}.")
            enums((*here, DP.ENUM_TYPE_FIELD_NUMBER), list(message.enum_type))

    messages((FDP.MESSAGE_TYPE_FIELD_NUMBER,), list(file.message_type), "")
    enums((FDP.ENUM_TYPE_FIELD_NUMBER,), list(file.enum_type))
    for i, service in enumerate(file.service):
        check((FDP.SERVICE_FIELD_NUMBER, i), service.name)
        for j, method in enumerate(service.method):
            check((FDP.SERVICE_FIELD_NUMBER, i, SDP.METHOD_FIELD_NUMBER, j), f"{service.name}.{method.name}")
    return missing


def test_every_element_of_the_proto_has_a_leading_comment() -> None:
    (file,) = [f for f in codegen.descriptor_set(source_info=True).file if f.name == PROTO_FILE]
    assert len(file.message_type) > 20  # the walk really saw the file
    assert uncommented(file) == []


def test_the_comment_check_finds_a_missing_comment(tmp_path: Path) -> None:
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "demo.proto").write_text(
        'syntax = "proto3";\npackage demo;\n'
        "// A message.\nmessage Commented {\n  // A field.\n  string a = 1;\n  string b = 2;\n"
        "  optional int32 c = 3;  // trailing only\n}\n"
        "enum Kind {\n  // Zero.\n  KIND_UNSPECIFIED = 0;\n}\n"
    )
    (file,) = codegen.descriptor_set(tmp_path, source_info=True).file
    assert uncommented(file) == ["Commented.b", "Commented.c", "Kind"]


def test_enums_start_with_an_unspecified_zero_and_prefix_their_values() -> None:
    for enum in pb.DESCRIPTOR.enum_types_by_name.values():
        prefix = "".join(f"_{c}" if c.isupper() else c.upper() for c in enum.name).lstrip("_") + "_"
        assert enum.values_by_number[0].name == f"{prefix}UNSPECIFIED", enum.name
        assert all(v.name.startswith(prefix) for v in enum.values), enum.name


# --- the service and its messages ----------------------------------------------------------------


def test_the_service_has_four_rpcs_with_their_streaming_shapes() -> None:
    service = pb.DESCRIPTOR.services_by_name["Translator"]
    shapes = {
        m.name: (m.input_type.name, m.output_type.name, m.client_streaming, m.server_streaming)
        for m in service.methods
    }
    assert shapes == {
        "Translate": ("TranslateRequest", "TranslateResponse", False, False),
        "TranslateStream": ("TranslateStreamRequest", "TranslateStreamResponse", False, True),
        "Attend": ("AttendRequest", "AttendResponse", False, False),
        "GetModelInfo": ("GetModelInfoRequest", "GetModelInfoResponse", False, False),
    }


STRATEGIES = {
    "greedy": pb.TranslateOptions(greedy=pb.Greedy()),
    "beam": pb.TranslateOptions(beam=pb.BeamSearch(beam_size=4, length_penalty=0.0), n_best=3),
    "sampling": pb.TranslateOptions(sampling=pb.Sampling(temperature=0.7, top_k=50, top_p=0.9, seed=0)),
}


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_a_translate_request_round_trips_with_each_strategy(strategy: str) -> None:
    options = pb.TranslateOptions()
    options.CopyFrom(STRATEGIES[strategy])
    options.model = "en-fr-small"
    options.stopping.CopyFrom(pb.StoppingCriteria(max_output_tokens=64, min_output_tokens=2))
    options.target_prefix = "Le chat"
    options.return_tokens = options.return_timings = True
    request = pb.TranslateRequest(texts=["The cat sleeps.", "I love cats."], options=options)

    back = pb.TranslateRequest.FromString(request.SerializeToString())

    assert back == request
    assert back.options.WhichOneof("strategy") == strategy
    assert list(back.texts) == ["The cat sleeps.", "I love cats."]


def test_optional_fields_tell_zero_from_unset() -> None:
    # Zero is a real length penalty and a real seed; unset means the documented default.
    assert not pb.BeamSearch(beam_size=4).HasField("length_penalty")
    assert pb.BeamSearch.FromString(pb.BeamSearch(length_penalty=0.0).SerializeToString()).HasField(
        "length_penalty"
    )
    assert pb.Sampling.FromString(pb.Sampling(seed=0).SerializeToString()).HasField("seed")
    assert not pb.AttendRequest(source="x").HasField("target")
    assert pb.AttendRequest(source="x", target="").HasField("target")


def test_choosing_a_strategy_replaces_the_previous_one() -> None:
    options = pb.TranslateOptions(beam=pb.BeamSearch(beam_size=4))
    options.sampling.temperature = 0.5
    assert options.WhichOneof("strategy") == "sampling"
    assert not options.HasField("beam")


def test_a_stream_message_is_either_a_delta_or_the_final_result() -> None:
    message = pb.TranslateStreamResponse(delta=pb.TextDelta(text="J'", token_ids=[17]))
    assert message.WhichOneof("event") == "delta"
    final = pb.TranslateResponse(
        translations=[pb.Translation(text="J'aime", finish_reason=pb.FINISH_REASON_END_OF_SEQUENCE)]
    )
    message.final.CopyFrom(final)
    assert message.WhichOneof("event") == "final"
    assert not message.HasField("delta")


# --- the wiring of a grpc.aio server: our service, health, reflection --------------------------------


class ModelInfoOnlyServicer(pb_grpc.TranslatorServicer):
    """A TEST stand-in, only for this API test: answers GetModelInfo; the other RPCs keep the
    generated default (UNIMPLEMENTED)."""

    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetModelInfoResponse:
        model = pb.ModelInfo(
            name="test-model",
            version="0.0.1",
            source_language="en",
            target_language="fr",
            variant=pb.MODEL_VARIANT_FP32,
            execution_providers=["CPUExecutionProvider"],
            limits=pb.ModelLimits(max_source_tokens=128, max_output_tokens=128, max_beam_size=8),
        )
        return pb.GetModelInfoResponse(models=[model], default_model=model.name)


@dataclass(frozen=True)
class Observed:
    """What a client saw of the server."""

    model_info: pb.GetModelInfoResponse
    health: int  # HealthCheckResponse.ServingStatus of SERVICE
    translate_code: grpc.StatusCode  # calling an RPC the stand-in does not implement
    reflected_services: list[str]
    reflected_methods: dict[str, tuple[str, str, bool]]  # name → (input, output, server streaming)


def _reflect(port: int) -> tuple[list[str], dict[str, tuple[str, str, bool]]]:
    """Ask the server, through reflection alone (no generated code), what it serves."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = sorted(database.get_services())
        service = DescriptorPool(database).FindServiceByName(SERVICE)
        methods = {
            m.name: (m.input_type.full_name, m.output_type.full_name, m.server_streaming)
            for m in service.methods
        }
    return services, methods


async def _serve_and_observe() -> Observed:
    server = grpc.aio.server()
    pb_grpc.add_TranslatorServicer_to_server(ModelInfoOnlyServicer(), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        await health_servicer.set(SERVICE, health_pb2.HealthCheckResponse.SERVING)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.TranslatorStub(channel)
            model_info = await stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
            check = health_pb2.HealthCheckRequest(service=SERVICE)
            status = (await health_pb2_grpc.HealthStub(channel).Check(check, timeout=10)).status
            try:
                await stub.Translate(pb.TranslateRequest(texts=["Hello."]), timeout=10)
                translate_code = grpc.StatusCode.OK
            except grpc.aio.AioRpcError as err:
                translate_code = err.code()
        # The reflection client is synchronous: off the event loop, which keeps serving.
        services, methods = await asyncio.to_thread(_reflect, port)
    finally:
        await server.stop(grace=None)
    return Observed(model_info, status, translate_code, services, methods)


@pytest.fixture(scope="module")
def observed() -> Observed:
    return asyncio.run(_serve_and_observe())


def test_the_stand_in_servicer_answers_get_model_info(observed: Observed) -> None:
    assert observed.model_info.default_model == "test-model"
    (model,) = observed.model_info.models
    assert (model.variant, model.limits.max_beam_size) == (pb.MODEL_VARIANT_FP32, 8)
    assert observed.translate_code == grpc.StatusCode.UNIMPLEMENTED


def test_the_standard_health_service_reports_serving(observed: Observed) -> None:
    assert observed.health == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_translator_and_the_standard_services(observed: Observed) -> None:
    assert observed.reflected_services == sorted([SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME])


def test_reflection_serves_the_full_service_descriptor(observed: Observed) -> None:
    assert observed.reflected_methods == {
        "Translate": ("translator.v1.TranslateRequest", "translator.v1.TranslateResponse", False),
        "TranslateStream": (
            "translator.v1.TranslateStreamRequest",
            "translator.v1.TranslateStreamResponse",
            True,
        ),
        "Attend": ("translator.v1.AttendRequest", "translator.v1.AttendResponse", False),
        "GetModelInfo": ("translator.v1.GetModelInfoRequest", "translator.v1.GetModelInfoResponse", False),
    }
