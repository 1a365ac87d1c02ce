"""Typed asyncio clients of the QA service (`pipeline.client`), the assistant CLI and the per-turn latency budget."""
