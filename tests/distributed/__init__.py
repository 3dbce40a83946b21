"""Multi-process tests (torchrun, gloo on CPU) and the shared launcher helper ``launch.run_torchrun``."""
