"""Layer 6, the application: loading a local model, the demo's synthetic model and data, the
real pretrained model."""
