"""arkd.evaluation."""
