"""Layer 4, evaluation: prompts and benchmarks, judges, generation and perplexity, plots,
reports, `evaluate` (conditions, intervals, paired tests) and `calibrate` (the largest strength
within a perplexity budget)."""
