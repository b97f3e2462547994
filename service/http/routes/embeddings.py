"""Embeddings in OpenAI's shape (as infinity-emb serves CLIP): `GET /v1/models` lists the backbone, and
`POST /v1/embeddings` embeds texts (through the prompt-aware text encoder) or, with `"modality": "image"`, base64
images (through the classify pipeline: the same decoding limits, micro-batcher and shared image forward).

Every embedding is L2-normalized, so an image's and a label's embeddings score like a zero-shot task:
softmax(logit_scale × image · text), with `logit_scale` from the model's entry in `GET /v1/models`.
"""

from __future__ import annotations

import base64
from typing import Annotated, Any

import anyio
import numpy as np
import torch
from fastapi import APIRouter, Path, Request, Response
from pydantic import ValidationError

from service.http.deps import CLASSIFY_ERRORS, READ_ERRORS, AppState, ClassifyAccess, State
from service.http.errors import error_responses
from service.http.schemas import Embedding, EmbeddingRequest, EmbeddingResponse, EmbeddingUsage, ModelCard, ModelList
from service.http.uploads import check_image_count, decode_base64_image
from service.serving.errors import ServiceError
from service.serving.text_features import text_embeddings, token_counts

router = APIRouter(tags=["embeddings"])
EMBEDDINGS_BODY = {"requestBody": {"required": True, "content": {"application/json": {
    "schema": EmbeddingRequest.model_json_schema()}}}}
ModelId = Annotated[str, Path(description="a model id from GET /v1/models", examples=["promptserve-tiny"])]


@router.get("/v1/models", summary="The models /v1/embeddings takes (OpenAI's list): the backbone",
            dependencies=ClassifyAccess, responses=error_responses(*READ_ERRORS))
async def list_models(state: State) -> ModelList:
    return ModelList(data=[_model_card(state)])


@router.get("/v1/models/{model:path}", summary="One model of GET /v1/models", dependencies=ClassifyAccess,
            responses=error_responses(*READ_ERRORS, 404))
async def get_model(model: ModelId, state: State) -> ModelCard:
    return _checked_model(state, model)


def _model_card(state: AppState) -> ModelCard:
    backbone = state.backbone
    return ModelCard(id=backbone.spec.model, created=int(state.started_at), modalities=["text", "image"],
                     embedding_dimensions=backbone.sizes.embed_dim, logit_scale=backbone.logit_scale)


def _checked_model(state: AppState, model: str) -> ModelCard:
    card = _model_card(state)
    if model != card.id:
        raise ServiceError(404, "unknown_model", f"unknown model {model!r}; known: {[card.id]}", field="model")
    return card


@router.post("/v1/embeddings", dependencies=ClassifyAccess, openapi_extra=EMBEDDINGS_BODY,
             response_model=EmbeddingResponse, responses=error_responses(*CLASSIFY_ERRORS),
             summary="Embed texts or (modality image) base64 images with the backbone, L2-normalized")
async def create_embeddings(request: Request, state: State) -> Response:
    state.pipeline.admit((), 1)  # queue room, before the body is read
    asked = _parse(await request.body())
    card = _checked_model(state, asked.model)
    if asked.dimensions is not None and asked.dimensions != card.embedding_dimensions:
        raise ServiceError(422, "bad_dimensions", f"model {card.id!r} embeds in {card.embedding_dimensions} "
                           f"dimensions, not {asked.dimensions}", field="body.dimensions")
    inputs = _inputs(asked.input)
    if asked.modality == "image":
        features, tokens = await _embed_images(state, inputs), 0
    else:
        features, tokens = await _embed_texts(state, inputs)

    def answer() -> Response:
        data = [Embedding(index=i, embedding=_encoded(row, asked.encoding_format)) for i, row in enumerate(features)]
        body = EmbeddingResponse(data=data, model=card.id, usage=EmbeddingUsage(prompt_tokens=tokens,
                                                                                 total_tokens=tokens))
        return Response(body.model_dump_json(), media_type="application/json")

    return await anyio.to_thread.run_sync(answer)


def _parse(body: bytes) -> EmbeddingRequest:
    try:
        return EmbeddingRequest.model_validate_json(body)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(part) for part in ("body", *first["loc"]))
        raise ServiceError(422, "bad_embedding_request", f"{where}: {first['msg']}", field=where) from exc


def _inputs(given: str | list[Any]) -> list[str]:
    inputs = [given] if isinstance(given, str) else given
    if not inputs:
        raise ServiceError(422, "no_inputs", '"input" is empty: send a text or a list of them', field="body.input")
    for i, item in enumerate(inputs):
        if not isinstance(item, str):
            raise ServiceError(422, "bad_input", f"input[{i}] is not a string: token arrays are not taken, send "
                               "texts (or base64 images with modality image)", field="body.input")
    return inputs


async def _embed_images(state: AppState, inputs: list[str]) -> torch.Tensor:
    check_image_count(len(inputs), state.settings)
    uploads = [(f"input[{i}]", _image_bytes(text, state.settings.max_image_bytes, f"input[{i}]"))
               for i, text in enumerate(inputs)]
    return await state.pipeline.embed(uploads)


def _image_bytes(text: str, max_bytes: int, name: str) -> bytes:
    if text.startswith(("http://", "https://")):
        raise ServiceError(422, "bad_input", f"{name}: this service fetches no URLs; send the image itself as "
                           "base64 or a data URI", field="body.input")
    return decode_base64_image(text, max_bytes=max_bytes, filename=name)


async def _embed_texts(state: AppState, texts: list[str]) -> tuple[torch.Tensor, int]:
    """The texts' embeddings, encoded one request at a time in the activation worker, and their token count."""
    settings, context = state.settings, state.backbone.text.context_length
    if len(texts) > settings.max_embedding_inputs:
        raise ServiceError(413, "too_many_inputs", f"at most {settings.max_embedding_inputs} texts a request")
    for i, text in enumerate(texts):
        if len(text) > settings.max_embedding_text_chars:
            raise ServiceError(422, "text_too_long", f"input[{i}] holds {len(text)} characters; at most "
                               f"{settings.max_embedding_text_chars}", field="body.input")
    counts = await anyio.to_thread.run_sync(token_counts, state.backbone, texts)
    for i, count in enumerate(counts):
        if count > context:
            raise ServiceError(422, "text_too_long", f"input[{i}] needs {count} tokens; the text context holds "
                               f"{context}", field="body.input")
    features = await anyio.to_thread.run_sync(text_embeddings, state.backbone, texts,
                                              limiter=state.activation_limiter)
    return features, sum(counts)


def _encoded(row: torch.Tensor, encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":  # what the openai client asks for by default: little-endian float32
        return base64.b64encode(np.asarray(row.numpy(), "<f4").tobytes()).decode()
    return row.tolist()
