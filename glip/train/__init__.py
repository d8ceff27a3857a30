"""Training-side pieces of GLIP (losses and target assignment, spec §4)."""
