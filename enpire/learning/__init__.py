"""A small learning library for the trainer: datasets from the episode store, behaviour cloning, offline RL.

Everything here runs in the trainer's recipe subprocess (`python -m enpire.learning.recipes`), never in
a cell. A learned policy ships as a numpy-only policy file (`mlp_policy.py`) plus `weights.npz`.
"""
