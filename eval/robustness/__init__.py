"""``vtprune robustness``: how stable each method's selection is under pixel noise and corner patches (``run``), the
perturbations (``perturb``) and the command-line options (``args``, importable without torch)."""
