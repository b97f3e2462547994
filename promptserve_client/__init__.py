"""A small typed client for the promptserve HTTP API (httpx only: no torch, no service code)."""

from promptserve_client.client import (
    AsyncClient,
    Client,
    ImageAnswer,
    ImagePredictions,
    Prediction,
    PromptserveError,
    TaskAnswer,
    TaskSummary,
)

__all__ = ["AsyncClient", "Client", "ImageAnswer", "ImagePredictions", "Prediction", "PromptserveError", "TaskAnswer",
           "TaskSummary"]
