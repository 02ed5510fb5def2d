"""Layer 0, the foundation: the activations, the scale math, fingerprints, file writes,
progress bars, and the table of the flat layout's module paths."""
