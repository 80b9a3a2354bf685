"""The steps of an action request in order (path.py), a batch as the same steps over a list
(batch.py), and the body and validation steps (input.py)."""
