"""Bridges from a stage-one cache to training frameworks users already run (Hugging Face Trainer)."""
