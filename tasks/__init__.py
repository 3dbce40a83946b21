"""Downstream tasks (Megatron's ``tasks/``): sequence classification on LRA ListOps and the long-range probe."""
