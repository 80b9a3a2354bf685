from lib import module_blueprint

from .routes import routes

blueprint = module_blueprint(__name__, routes)
