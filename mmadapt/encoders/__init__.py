"""Frozen unimodal encoders; each file is one backend. Looked up through mmadapt.core.registry only."""
