"""arkd.losses."""
