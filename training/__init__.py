"""Recipes that trained the embedded models (run from a clone's root: ``python -m training.train``; not installed)."""
