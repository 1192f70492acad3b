"""Small helpers shared by every layer (``models/``, ``datasets/``, ``trainers/``, ``tools/``); no torch or Dassl."""
