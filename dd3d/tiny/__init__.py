"""The embedded default model: small diffusers components sharing Stable Diffusion's classes and layout."""
