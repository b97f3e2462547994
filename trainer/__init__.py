"""promptserve trainer: learns prompt bundles for a frozen open_clip backbone."""
