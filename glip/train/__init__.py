"""Training GLIP on the synthetic world: the losses and ATSS target assignment (`losses`), the data
(`data`: gold detection, gold grounding and pseudo-labelled web scenes as one item format), the training
loop with checkpoints and resume (`trainer`), the `train` / `pseudo-label` / `eval` commands (`cli`),
the diagnostics of what a trained model keeps (`diagnose`) and the training report (`report`)."""
