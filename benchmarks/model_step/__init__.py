"""One forward or engine step of a GLM-4.5-Air-shaped model: decode and EAGLE steps, overlap, profiles."""
