"""Public path of deltatune's exceptions (`deltatune.errors.ConfigError`); they live in `deltatune.core.errors`."""
from .core.errors import *  # noqa: F401,F403
from .core.errors import __all__  # noqa: F401
