"""Pipelines around pretrained diffusers models (above methods, below the CLI).

* :mod:`rayflow.pipelines.sd` - Stable Diffusion / SDXL teachers from a local pipeline folder, latent caption
  data, LoRA students for every method, student loading and prompt sampling.
"""
