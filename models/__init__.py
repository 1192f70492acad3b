"""Pure-PyTorch models of the prompt learners (no Dassl import here)."""
