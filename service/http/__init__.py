"""The HTTP face: the FastAPI app (`app`), its state and auth as dependencies (`deps`), one module per route
family (`routes/`), error bodies, request limits, upload parsing, metrics and the uvicorn server."""
