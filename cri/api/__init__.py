"""moorage cri/api."""
