"""Analysis tools around MustDrop Lens: the synthetic scene world, the toy LLaVA model and its training."""
