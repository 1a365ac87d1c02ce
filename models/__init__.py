"""The shipped fine-tuned models, installed as package data (`realtime_qa.models`; see qacore.default_engine)."""
