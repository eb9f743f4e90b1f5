"""tether.feedback."""
