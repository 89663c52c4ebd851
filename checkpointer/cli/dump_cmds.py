"""dump, pre-dump, converge, check, untrack."""
