"""Training: settings, steps and the run loop."""
