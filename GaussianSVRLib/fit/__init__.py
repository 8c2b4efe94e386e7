"""Fitting the model to the slices: bias correction, registration, masks for stacks without one,
initialization, warm start, the optimization loop, slice quality and the pose search."""
