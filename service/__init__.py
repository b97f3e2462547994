"""promptserve service: many few-shot prompt classifiers on one frozen open_clip backbone.

Layers, lowest first; each imports only the ones below it (docs/architecture.md):
core (the frozen model and its encoders) → methods (one spec per prompt method) → bundle (the file format) →
registry (where bundles are stored) → serving (tasks, batching, the request path) → http (the FastAPI app).
"""

__version__ = "0.1.0"
