"""Honest comparisons: seeds, ensembles and hyperparameter sweeps over the classification and sonnet tasks.

    python -m experiments seeds    ...   # one configuration under several seeds: mean ± std (experiments.seeds)
    python -m experiments ensemble ...   # checkpoints: class probabilities averaged, sonnets by MBR (.ensemble)
    python -m experiments sweep    ...   # an Optuna search on SQLite: resumable, shared, pruned (.sweep)
    python -m experiments plot     ...   # runs' curves overlaid, labelled by what differs; seeds as bands (.plot)
    python -m experiments quantize ...   # a saved run with int8/int4/bf16 weights: dev before and after (.quantize)

Seeds and sweeps run the task's own script (``classifier.py``, ``paraphrase_detection.py``,
``sonnet_generation.py``) with its flags passed through after ``--``, each run in its own run
folder (``experiments.launch``); tables are written as CSV and markdown (``experiments.tables``).
Tracking (``--report_to``) is a flag of every task, so it passes through too.
"""
