"""show, decode, info, x, extract, verify."""
