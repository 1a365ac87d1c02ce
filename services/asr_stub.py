"""The ASR stage as a deterministic STUB behind the `asr.v1` contract: it does not recognize speech.

Rules (docs/chain.md repeats them for users):

* A text frame passes through: its text is the final transcript (confidence 1).
* Audio (16 kHz mono PCM16, raw or as a WAV file) is checked and counted, never recognized: the
  final transcript is the `stub_transcript` of the EndOfUtterance frame, else of the stream's
  config. The assistant CLI reads it from a `.txt` file beside each WAV. Audio without a transcript
  fails in-band with FAILED_PRECONDITION ("this stub cannot recognize speech").
* Interim results (when asked for and a transcript is known up front) are the transcript's first
  words, as many as `words_per_second` times the audio seconds received, with stability 0.5.
* Simulated latency, so that the latency view has something real to show: `chunk_latency_ms` after
  every audio chunk and `final_latency_ms` between the end of the utterance (typed or spoken) and
  the final result. Both default to 0.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import struct
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
from realtime_qa.services.interceptors import InvalidMessage
from realtime_qa.services.logctx import request_context
from realtime_qa.services.stage_server import StageBinding, StageServer, trace_id_of

from realtime_qa.asr.v1 import asr_pb2, asr_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = asr_pb2.DESCRIPTOR.services_by_name["Recognizer"].full_name
SAMPLE_RATE = 16_000
BYTES_PER_SECOND = 2 * SAMPLE_RATE  # mono PCM16
MAX_CHUNK_BYTES = 1024 * 1024
MAX_TEXT_CHARS = 4096
MAX_WAV_HEADER_BYTES = 4096  # RIFF chunks before "data" (fmt, LIST, ...) must fit in this


class AudioEncoding(enum.Enum):
    PCM16 = "pcm16"  # raw little-endian signed 16-bit, mono, 16 kHz
    WAV = "wav"  # a RIFF/WAVE file of the same audio, header in the first bytes


@dataclass(frozen=True)
class RecognitionSettings:
    """The stream's config."""

    encoding: AudioEncoding = AudioEncoding.WAV
    interim_results: bool = False
    stub_transcript: str = ""


@dataclass(frozen=True)
class TextFrame:
    text: str


@dataclass(frozen=True)
class AudioFrame:
    content: bytes


@dataclass(frozen=True)
class EndFrame:
    stub_transcript: str = ""


UtteranceFrame = TextFrame | AudioFrame | EndFrame


@dataclass(frozen=True)
class Recognition:
    """One interim or final result."""

    transcript: str
    is_final: bool
    stability: float = 0.0
    confidence: float = 0.0
    audio_seconds: float = 0.0
    processing_ns: int = 0  # final: end of utterance to this result, server side


class RecognitionError(Exception):
    """The utterance cannot be recognized; `code` is the gRPC status the stage reports."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class AsrStubConfig:
    chunk_latency_ms: float = 0.0  # simulated work after each audio chunk
    final_latency_ms: float = 0.0  # simulated work from the end of the utterance to the final result
    max_utterance_s: float = 60.0  # longer audio fails (memory and time stay bounded)
    words_per_second: float = 2.5  # interim results reveal the transcript at this speaking rate

    def __post_init__(self) -> None:
        if not (0 <= self.chunk_latency_ms <= 10_000 and 0 <= self.final_latency_ms <= 10_000):
            raise ValueError("simulated ASR latencies must be in [0, 10000] ms")
        if not 0 < self.max_utterance_s <= 3600 or not 0 < self.words_per_second <= 100:
            raise ValueError("max utterance must be in (0, 3600] s and words per second in (0, 100]")


class StreamMisuseError(RecognitionError):
    """The client broke the stream's protocol (a second config): the stream fails with INVALID_ARGUMENT."""

    def __init__(self, message: str) -> None:
        super().__init__(grpc.StatusCode.INVALID_ARGUMENT, message)


def invalid(message: str) -> RecognitionError:
    return RecognitionError(grpc.StatusCode.INVALID_ARGUMENT, message)


class WavReader:
    """Accepts a WAV file chunk by chunk: checks the header (16 kHz, mono, PCM16) and counts the samples."""

    def __init__(self) -> None:
        self._head = b""
        self.header_done = False
        self.pcm_bytes = 0

    def feed(self, content: bytes) -> None:
        if self.header_done:
            self.pcm_bytes += len(content)
            return
        self._head += content
        offset = self._data_offset()
        if offset is None:
            if len(self._head) > MAX_WAV_HEADER_BYTES:
                raise invalid(f"no WAV data chunk in the first {MAX_WAV_HEADER_BYTES} bytes")
            return
        self.header_done = True
        self.pcm_bytes = len(self._head) - offset
        self._head = b""

    def _data_offset(self) -> int | None:
        """Offset of the PCM data once the header is complete (None: need more bytes)."""
        head = self._head
        if len(head) < 12:
            return None
        if head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            raise invalid("audio is not a RIFF/WAVE file (session audio format is WAV)")
        position, seen_format = 12, False
        while position + 8 <= len(head):
            chunk_id, size = head[position : position + 4], struct.unpack("<I", head[position + 4 : position + 8])[0]
            body = position + 8
            if chunk_id == b"data":
                if not seen_format:
                    raise invalid("WAV data chunk before its fmt chunk")
                return body
            if body + size > len(head):
                return None
            if chunk_id == b"fmt ":
                if size < 16:
                    raise invalid("WAV fmt chunk too short")
                audio_format, channels, rate, _, _, bits = struct.unpack("<HHIIHH", head[body : body + 16])
                if (audio_format, channels, rate, bits) != (1, 1, SAMPLE_RATE, 16):
                    raise invalid(
                        f"WAV must be PCM 16-bit mono {SAMPLE_RATE} Hz, got format {audio_format}, "
                        f"{channels} channel(s), {rate} Hz, {bits}-bit"
                    )
                seen_format = True
            position = body + size + (size & 1)
        return None


class AsrStub:
    """The recognizer's logic, independent of gRPC: frames of one utterance in, results out."""

    def __init__(self, config: AsrStubConfig | None = None) -> None:
        self.config = config or AsrStubConfig()

    async def recognize(
        self, settings: RecognitionSettings, frames: AsyncIterator[UtteranceFrame]
    ) -> AsyncIterator[Recognition]:
        """Results of one utterance: interim ones while audio arrives, then exactly one final one.

        Raises RecognitionError for an utterance that cannot be recognized.
        """
        config = self.config
        wav = WavReader() if settings.encoding is AudioEncoding.WAV else None
        raw_bytes = 0
        audio_seen = False
        last_interim = ""
        end = EndFrame()
        async for frame in frames:
            if isinstance(frame, TextFrame):
                if audio_seen:
                    raise invalid("a text frame inside an audio utterance")
                if not frame.text.strip() or len(frame.text) > MAX_TEXT_CHARS:
                    raise invalid(f"a text utterance must have 1..{MAX_TEXT_CHARS} characters")
                end_ns = time.perf_counter_ns()
                await self._simulate(config.final_latency_ms)
                yield Recognition(frame.text.strip(), True, confidence=1.0, processing_ns=_since(end_ns))
                return
            if isinstance(frame, EndFrame):
                end = frame
                break
            if len(frame.content) > MAX_CHUNK_BYTES:
                raise invalid(f"audio chunk of {len(frame.content):,} bytes exceeds {MAX_CHUNK_BYTES:,}")
            audio_seen = True
            if wav is not None:
                wav.feed(frame.content)
            else:
                raw_bytes += len(frame.content)
            seconds = (wav.pcm_bytes if wav is not None else raw_bytes) / BYTES_PER_SECOND
            if seconds > config.max_utterance_s:
                raise invalid(f"utterance longer than {config.max_utterance_s:g} s")
            await self._simulate(config.chunk_latency_ms)
            if settings.interim_results and settings.stub_transcript:
                heard = self._prefix(settings.stub_transcript, seconds)
                if heard and heard != last_interim:  # a new word: an interim result
                    last_interim = heard
                    yield Recognition(heard, False, 0.5, audio_seconds=seconds)
        end_ns = time.perf_counter_ns()
        if not audio_seen:
            raise invalid("the utterance ended without text or audio")
        if wav is not None and not wav.header_done:
            raise invalid("the WAV audio ended inside its header")
        if raw_bytes % 2:
            raise invalid("PCM16 audio has an odd number of bytes")
        transcript = (end.stub_transcript or settings.stub_transcript).strip()
        await self._simulate(config.final_latency_ms)
        if not transcript:
            raise RecognitionError(
                grpc.StatusCode.FAILED_PRECONDITION,
                "no transcript for this audio: the ASR stub cannot recognize speech (give a stub_transcript, "
                "e.g. a .txt file beside the WAV)",
            )
        seconds = (wav.pcm_bytes if wav is not None else raw_bytes) / BYTES_PER_SECOND
        yield Recognition(transcript, True, confidence=1.0, audio_seconds=seconds, processing_ns=_since(end_ns))

    def _prefix(self, transcript: str, seconds: float) -> str:
        words = transcript.split()
        count = min(len(words) - 1, int(seconds * self.config.words_per_second))
        return " ".join(words[: max(0, count)])

    @staticmethod
    async def _simulate(latency_ms: float) -> None:
        if latency_ms > 0:
            await asyncio.sleep(latency_ms / 1000)


def _since(start_ns: int) -> int:
    return time.perf_counter_ns() - start_ns


# -- the asr.v1 edge ---------------------------------------------------------------------------------

_ENCODINGS = {
    asr_pb2.AUDIO_ENCODING_UNSPECIFIED: AudioEncoding.PCM16,
    asr_pb2.LINEAR16: AudioEncoding.PCM16,
    asr_pb2.WAV: AudioEncoding.WAV,
}


def settings_from_pb(config: asr_pb2.RecognitionConfig) -> RecognitionSettings:
    if config.sample_rate_hertz not in (0, SAMPLE_RATE):
        raise invalid(f"sample rate must be {SAMPLE_RATE} Hz, got {config.sample_rate_hertz}")
    encoding = _ENCODINGS.get(config.encoding)
    if encoding is None:
        raise invalid(f"unknown audio encoding {config.encoding}")
    return RecognitionSettings(encoding, config.interim_results, config.stub_transcript)


def settings_to_pb(settings: RecognitionSettings) -> asr_pb2.RecognitionConfig:
    encoding = asr_pb2.WAV if settings.encoding is AudioEncoding.WAV else asr_pb2.LINEAR16
    return asr_pb2.RecognitionConfig(
        encoding=encoding,
        sample_rate_hertz=SAMPLE_RATE,
        interim_results=settings.interim_results,
        stub_transcript=settings.stub_transcript,
    )


def frame_from_pb(message: asr_pb2.StreamingRecognizeRequest | InvalidMessage) -> UtteranceFrame:
    if isinstance(message, InvalidMessage):  # could not be read (services.interceptors.MessageInterceptor)
        raise StreamMisuseError(message.message)
    kind = message.WhichOneof("request")
    if kind == "text":
        return TextFrame(message.text)
    if kind == "audio":
        return AudioFrame(message.audio.content)
    if kind == "end_of_utterance":
        return EndFrame(message.end_of_utterance.stub_transcript)
    raise StreamMisuseError("a second config, or an empty request, after the first message")


def frame_to_pb(frame: UtteranceFrame) -> asr_pb2.StreamingRecognizeRequest:
    if isinstance(frame, TextFrame):
        return asr_pb2.StreamingRecognizeRequest(text=frame.text)
    if isinstance(frame, AudioFrame):
        return asr_pb2.StreamingRecognizeRequest(audio=asr_pb2.AudioChunk(content=frame.content))
    end = asr_pb2.EndOfUtterance(stub_transcript=frame.stub_transcript)
    return asr_pb2.StreamingRecognizeRequest(end_of_utterance=end)


def recognition_to_pb(result: Recognition) -> asr_pb2.StreamingRecognizeResponse:
    return asr_pb2.StreamingRecognizeResponse(
        transcript=result.transcript,
        is_final=result.is_final,
        stability=result.stability,
        confidence=result.confidence,
        audio_seconds=result.audio_seconds,
        processing_ns=result.processing_ns,
    )


class RecognizerService(asr_pb2_grpc.RecognizerServicer):
    """asr.v1.Recognizer over an AsrStub."""

    def __init__(self, stub: AsrStub) -> None:
        self.stub = stub

    async def StreamingRecognize(  # noqa: N802 - gRPC method name
        self, request_iterator: Any, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[asr_pb2.StreamingRecognizeResponse]:
        with request_context(trace_id_of(context)):
            first = await anext(aiter(request_iterator), None)
            if first is None:
                return
            if isinstance(first, InvalidMessage) or first.WhichOneof("request") != "config":
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first message must be a config")
            try:
                settings = settings_from_pb(first.config)
                async for result in self.stub.recognize(settings, _frames(request_iterator)):
                    yield recognition_to_pb(result)
            except StreamMisuseError as exc:
                await context.abort(exc.code, exc.message)
            except RecognitionError as exc:
                log.info("utterance not recognized: %s: %s", exc.code.name, exc.message)
                error = asr_pb2.Error(code=exc.code.value[0], message=exc.message)
                yield asr_pb2.StreamingRecognizeResponse(error=error)


async def _frames(request_iterator: Any) -> AsyncIterator[UtteranceFrame]:
    async for message in request_iterator:
        yield frame_from_pb(message)


def asr_binding(stub: AsrStub) -> StageBinding:
    service = RecognizerService(stub)
    return StageBinding(SERVICE_NAME, lambda server: asr_pb2_grpc.add_RecognizerServicer_to_server(service, server))


def asr_server(
    stub: AsrStub, host: str = "127.0.0.1", port: int = 0, interceptors: tuple[grpc.aio.ServerInterceptor, ...] = ()
) -> StageServer:
    """The ASR stub as its own gRPC server (with health checking)."""
    return StageServer("asr stub", [asr_binding(stub)], host, port, interceptors)
