"""Training: dataset preparation (`prepare`), the training loop (`train`), checkpoints and optimizer.

Depends on `rtsvc` (models, features, mel); `rtsvc` never imports from here.
"""
