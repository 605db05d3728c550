"""The mask core: masks beside parameters, the four axes (patterns, distributions,
schedules, the method contract) and what every layer above builds on (registries,
targets, argument checks, measurements, progress bars).

Layer 0: imports nothing else of sparsenn."""
