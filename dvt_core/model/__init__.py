"""What a DVT is, from its spec alone: specs, the zoo, state shapes, the reuse resize, init recipe, MACs."""
