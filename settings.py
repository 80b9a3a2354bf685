"""Where a deployment registers its modules. Every other setting comes from the environment
(and `env/<ENVIRONMENT>/.env`): lib.core.config reads and checks them all, once, and lists them
(`SETTINGS`, the docs' configuration page).
"""

from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent

# Registering a module is one line here. Modules for one deployment only (the benchmark's
# `modules.bench`, say) are named in EXTRA_MODULES instead.
MODULES = [
    'modules.example',
]
