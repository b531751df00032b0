"""HTTP layer: OpenAI-compatible request/response schemas and routes."""
