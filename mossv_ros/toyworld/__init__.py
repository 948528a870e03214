"""Toyworld: a procedural streaming world, transcripts in the MOSS real-time grammar, and a
tiny MOSS-architecture model trained on it (``mossv-ros toyworld train|eval|bag``)."""
from pathlib import Path


def shipped_model_dir() -> Path:
    """The committed toyworld checkpoint (the demo's default model)."""
    return Path(__file__).resolve().parent.parent / 'data' / 'toyworld'
