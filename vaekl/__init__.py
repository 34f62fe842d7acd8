"""vaekl: closed-form Gaussian KL divergences and Flax VAEs."""
