"""What the service tells operators: log lines and files, the access record of each request,
and the Prometheus metrics. Reads the finished request record; writes nothing the path reads."""
