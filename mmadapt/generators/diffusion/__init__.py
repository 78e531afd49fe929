"""The Stable-Diffusion-layout generator (U-Net, VAE, CLIP text encoder) and its diffusers exports."""
