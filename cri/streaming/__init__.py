"""moorage cri/streaming."""
