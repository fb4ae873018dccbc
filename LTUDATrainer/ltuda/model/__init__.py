"""Network, heads, prototype banks and the model folder."""
