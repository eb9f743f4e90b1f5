"""tether.recipes."""
