"""The weights dvt ships (safetensors with metadata) and their registry; data only."""
