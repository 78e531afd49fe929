"""mmadapt: multimodal models from frozen parts."""
