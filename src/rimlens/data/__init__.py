"""Training and test data: sources, convergence maps, particles, lens simulation, storage."""
