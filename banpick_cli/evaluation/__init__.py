"""Scoring a model on task sets, with or without a routing method: generation (`generate.py`), the
harness over the runtime (`harness.py`), and the lm-evaluation-harness model (`lm_eval.py`)."""
