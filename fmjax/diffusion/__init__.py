"""Gaussian diffusion (DDPM / DDIM): noise schedules, training targets and samplers.

``process.py`` is model-free pure jax.numpy; the diffusion objective and the sampling
evaluators call it with their own networks.
"""
