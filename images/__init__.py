"""moorage images."""
