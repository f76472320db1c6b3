"""The HTTP face: a FastAPI app, served by Ray Serve."""
