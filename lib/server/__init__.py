"""The process around the app: gunicorn's worker and logging adapters, the master's start-up
checks, and the `flask --app app` commands."""
