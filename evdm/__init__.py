"""evdm: endpoint-conditioned video diffusion (fill in the middle of a clip)."""
