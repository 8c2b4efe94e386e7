"""The volume and the acquisition: Gaussians, slice motion, the slice profile, the forward model and its
kernels, neighbour search, and the volume rendered on a grid."""
