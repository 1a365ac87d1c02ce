"""The shipped fine-tuned models, installed as package data (`realtime_qa_models`; see qacore.default_engine)."""
