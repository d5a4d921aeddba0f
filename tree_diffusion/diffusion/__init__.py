"""Stage 2: the path-conditioned diffusion model: the denoiser and its conditioning on the frozen
TreeVAE, the noise schedule, training, the sampler and its four modes, and the outputs."""
