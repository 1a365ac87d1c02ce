"""The asyncio gRPC question-answering service (`qa-serve`): batcher, health, reflection, metrics."""
