"""Flow-matching math (pure functions) and the Euler sampler with CFG-Zero*."""
