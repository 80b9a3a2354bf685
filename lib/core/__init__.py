"""The bottom layer: configuration, errors as data, JSON, the request's record. Imports nothing of ours."""
