"""Shared building blocks every model stands on: layers (dense, norms, MLP, stacked layers, timestep
embedding), attention kernels (xla / cudnn / splash), rope (axes on explicit coordinates), audio
(projectors, per-frame audio cross-attention), context_parallel (ulysses / ring attention)."""
