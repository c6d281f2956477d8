"""arkd.policy."""
