"""A small typed client for the promptserve HTTP API (httpx only: no torch, no service code)."""

from promptserve_client.client import Client, ImageAnswer, Prediction, PromptserveError, TaskAnswer, TaskSummary

__all__ = ["Client", "ImageAnswer", "Prediction", "PromptserveError", "TaskAnswer", "TaskSummary"]
