"""keel: the production layer for LLM features."""
