from lib import module_blueprint

from .routes import events, routes

blueprint = module_blueprint(__name__, routes, events=events)
