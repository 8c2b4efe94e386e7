"""Files in and out: images, stacks, slices and masks as read; the Gaussians file; atomic outputs; the
progress protocol. Nothing here imports torch."""
