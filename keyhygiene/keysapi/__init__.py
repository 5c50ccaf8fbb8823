"""A thin typed client for the OpenRouter API-keys (management) endpoints."""
