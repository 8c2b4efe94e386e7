"""Measuring a result: metrics against a ground truth, and the agreement of a stack with a reconstruction."""
