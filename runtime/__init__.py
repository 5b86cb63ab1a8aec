"""moorage runtime."""
