"""Data: preprocessing, slice cache, phantoms."""
