"""Applications of the library: the ``demo`` and ``eval`` commands and what they share.

    demo.py          python -m lychee_fx demo: compile, generate, compare with full attention
    evaluate.py      python -m lychee_fx eval: quality against full attention (eval_methods,
                     eval_tasks, eval_report: the methods, the tasks, the report)
    decoding.py      prefill, decode loops, agreement
    passkey.py       synthetic passkey prompts (also role learning's training data)
    embedded.py      the embedded SmolLM2-135M-Instruct, loaded offline
    shipped_roles.py the learned role maps shipped in data/
    progress.py      progress bars

They import the core (``lychee_fx.backend``, roles, options, ops, reference, report); the core
never imports them.
"""
