"""Reproduction of the paper's experiment: a char-level GPT trained with CE or CE + margin barrier.

Modules:
    config   -- YAML experiment configs (dataclasses, strict validation).
    data     -- corpora (built-in KJV text, WikiText-2 raw, any train/valid/test .txt) and batching.
    model    -- a small pre-LN nanoGPT-style char GPT that computes the barrier on each layer's q, k, v.
    evaluate -- clean and embedding-noise BPC, margin and support-token statistics.
    train    -- one training run from a config (``python -m barrier_ops.experiments.train``).
    sweep    -- resumable lambda x seed grid writing one CSV (``python -m barrier_ops.experiments.sweep``).
    plots    -- matplotlib figures from run directories and the sweep CSV.
    demo     -- the README demo: one CE and one barrier model, a table and plots.

Needs the ``experiments`` extra (pyyaml, matplotlib, tqdm).
"""
