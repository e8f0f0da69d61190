"""Building blocks every architecture file composes: linear layers, norms, attention, MLPs."""
