"""The embedded default task and model: Countdown problems, traces, tokenizer, training."""
