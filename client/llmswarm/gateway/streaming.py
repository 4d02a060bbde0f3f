"""Server-sent events, as OpenAI streams them: ``data: <json>`` per chunk, then ``data: [DONE]``.

:class:`SseWriter` bounds what a client can cost: a write that cannot complete within
``write_timeout`` (the client stopped reading, and the buffers between us are full) or
that fails (the client went away) raises :class:`ClientGone`, and the connection is
dropped. :func:`stream_job` turns a job's events into chunks and cancels the job when
the client is gone, which ends its generation and frees its swarm session.

The first event is awaited before any byte is sent, so a request the swarm cannot serve
at all is still answered with a plain HTTP error in OpenAI's format.
"""

from __future__ import annotations

import asyncio
import json
from typing import Protocol

from aiohttp import web
from pydantic import BaseModel

from llmswarm.gateway.engine import Delta, Failed, Finished, Job
from llmswarm.gateway.openai_schema import (
    ChatCompletionChunk,
    ChunkChoice,
    ChunkDelta,
    Completion,
    CompletionChoice,
    Hop,
    SwarmInfo,
    Usage,
)

OUTCOME = web.RequestKey("outcome", str)  # the `status` label of a request whose response is already under way
SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class ClientGone(Exception):
    """The HTTP client went away (`reason` "disconnected") or stopped reading ("slow_client")."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class SseWriter:
    def __init__(self, request: web.Request, write_timeout: float) -> None:
        self.request = request
        self.write_timeout = write_timeout
        self.response = web.StreamResponse(status=200, headers=SSE_HEADERS)

    async def open(self) -> None:
        await self._guard(self.response.prepare(self.request))

    async def send(self, payload: BaseModel | dict[str, object] | str) -> None:
        if isinstance(payload, BaseModel):
            data = payload.model_dump_json()
        elif isinstance(payload, dict):
            data = json.dumps(payload, ensure_ascii=False)
        else:
            data = payload
        await self._guard(self.response.write(f"data: {data}\n\n".encode()))

    async def close(self) -> None:
        await self.send("[DONE]")
        await self._guard(self.response.write_eof())

    async def _guard(self, write: object) -> None:
        try:
            await asyncio.wait_for(write, self.write_timeout)  # type: ignore[arg-type]
        except TimeoutError:
            self._drop()
            raise ClientGone("slow_client") from None
        except ConnectionError:  # aiohttp's ClientConnectionResetError is one
            self._drop()
            raise ClientGone("disconnected") from None

    def _drop(self) -> None:
        transport = self.request.transport
        if transport is not None:
            transport.abort()  # unsent bytes are discarded; the connection's memory is freed at once


class Chunks(Protocol):
    """How one endpoint wraps text in stream chunks."""

    def opening(self, chain: list[tuple[str, int, int]]) -> list[BaseModel]: ...
    def delta(self, text: str) -> BaseModel: ...
    def final(self, result: Finished) -> BaseModel: ...
    def usage(self, result: Finished) -> BaseModel: ...


def swarm_info(chain: list[tuple[str, int, int]]) -> SwarmInfo:
    return SwarmInfo(chain=[Hop(server=s, start=a, end=b) for s, a, b in chain])


class ChatChunks:
    def __init__(self, id_: str, created: int, model: str) -> None:
        self.id, self.created, self.model = id_, created, model

    def _chunk(self, choices: list[ChunkChoice], **extra: object) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=choices, **extra)  # type: ignore[arg-type]

    def opening(self, chain: list[tuple[str, int, int]]) -> list[BaseModel]:
        return [self._chunk([ChunkChoice(delta=ChunkDelta(role="assistant", content=""))], llmswarm=swarm_info(chain))]

    def delta(self, text: str) -> BaseModel:
        return self._chunk([ChunkChoice(delta=ChunkDelta(content=text))])

    def final(self, result: Finished) -> BaseModel:
        return self._chunk([ChunkChoice(delta=ChunkDelta(), finish_reason=result.finish_reason)], llmswarm=swarm_info(result.chain))

    def usage(self, result: Finished) -> BaseModel:
        return self._chunk([], usage=Usage.of(result.prompt_tokens, result.completion_tokens))


class CompletionChunks:
    def __init__(self, id_: str, created: int, model: str, echo: str = "") -> None:
        self.id, self.created, self.model, self.echo = id_, created, model, echo

    def _chunk(self, choices: list[CompletionChoice], **extra: object) -> Completion:
        return Completion(id=self.id, created=self.created, model=self.model, choices=choices, **extra)  # type: ignore[arg-type]

    def opening(self, chain: list[tuple[str, int, int]]) -> list[BaseModel]:
        if not self.echo:
            return []
        return [self._chunk([CompletionChoice(text=self.echo, finish_reason=None)], llmswarm=swarm_info(chain))]

    def delta(self, text: str) -> BaseModel:
        return self._chunk([CompletionChoice(text=text, finish_reason=None)])

    def final(self, result: Finished) -> BaseModel:
        return self._chunk([CompletionChoice(text="", finish_reason=result.finish_reason)], llmswarm=swarm_info(result.chain))

    def usage(self, result: Finished) -> BaseModel:
        return self._chunk([], usage=Usage.of(result.prompt_tokens, result.completion_tokens))


async def stream_job(request: web.Request, job: Job, chunks: Chunks, include_usage: bool,
                     write_timeout: float) -> web.StreamResponse:
    """Stream a job's answer as server-sent events; returns the response once the stream has ended."""
    try:
        event = await job.next_event()
        if isinstance(event, Failed):
            raise event.error
        writer = SseWriter(request, write_timeout)
        await writer.open()
        for chunk in chunks.opening((event.chain or []) if isinstance(event, Delta) else []):
            await writer.send(chunk)
        while True:
            if isinstance(event, Delta):
                if event.text:
                    await writer.send(chunks.delta(event.text))
            elif isinstance(event, Finished):
                await writer.send(chunks.final(event))
                if include_usage:
                    await writer.send(chunks.usage(event))
                break
            else:
                request[OUTCOME] = event.error.metric
                await writer.send(event.error.body())
                break
            event = await job.next_event()
        await writer.close()
        return writer.response
    except ClientGone as gone:
        job.cancel(gone.reason)
        request[OUTCOME] = "cancelled"
        return writer.response
    finally:
        job.cancel("disconnected")  # a no-op when the job has finished
