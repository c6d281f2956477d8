"""arkd.cli."""
