"""The benchmark: the API against PostgreSQL's own limit, side by side in one run (`bench/run.sh`)."""
