"""Layer 4, evaluation: prompts and benchmarks, judges, generation and perplexity, plots,
reports, and `evaluate` (conditions, intervals, paired tests)."""
