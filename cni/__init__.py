"""moorage cni."""
