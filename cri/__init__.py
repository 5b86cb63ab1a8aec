"""moorage cri."""
