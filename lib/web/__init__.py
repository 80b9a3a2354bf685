"""The HTTP side: the WSGI entry and dispatcher, the module blueprints, the routes Flask serves
(health, the contract, /metrics), and Flask's JSON and error handling."""
