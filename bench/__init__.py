"""Load-balancing benchmark: every NGINX policy on the same seeded trace (`python -m bench`)."""
