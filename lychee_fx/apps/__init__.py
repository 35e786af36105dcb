"""Applications of the library: the ``demo`` and ``eval`` commands and what they share.

    demo.py          python -m lychee_fx demo: compile, generate, compare with full attention
    evaluate.py      python -m lychee_fx eval: quality against full attention
    eval_methods.py  the methods compared (role maps and options through the backend)
    eval_duo.py      the DuoAttention-style baseline (transformers' AttentionInterface)
    eval_tasks.py    the tasks: exact-length prompts, batched prefill and decoding, scoring
    eval_stats.py    95% intervals: seeded bootstrap over prompts, paired differences
    eval_summary.py  per-method metrics and the target checks
    eval_report.py   results.md and results.json; eval_plots.py: the PNG plots
    decoding.py      prefill, decode loops, agreement
    passkey.py       synthetic passkey prompts (also role learning's training data)
    embedded.py      the embedded SmolLM2-135M-Instruct, loaded offline
    shipped_roles.py the learned role maps shipped in data/
    progress.py      progress bars

They import the core (``lychee_fx.backend``, roles, options, ops, reference, report); the core
never imports them.
"""
