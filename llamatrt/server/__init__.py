"""`llamatrt serve`: an OpenAI-compatible HTTP server over the in-flight scheduler (FastAPI + uvicorn),
Prometheus metrics, replicas on Ray Serve, and a load benchmark for any OpenAI-compatible server."""
