"""arkd.data."""
