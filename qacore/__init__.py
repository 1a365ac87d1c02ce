"""The extractive-QA domain: featurization, span decoding, engines and SQuAD.

Knows nothing of gRPC or asyncio; services, pipeline, builder and training build on it.
"""
