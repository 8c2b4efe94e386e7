"""Simulated acquisitions: motion-corrupted stacks of thick slices from a high-resolution volume."""
