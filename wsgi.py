"""The application object for `gunicorn wsgi:app`."""

import logging
import os
import sys

from app import create_app
from config import ConfigError
from keys import KeysFileError

logging.basicConfig(
    level=os.environ.get("LOG_LEVEL", "INFO").upper(),
    format="%(asctime)s %(levelname)s %(name)s: %(message)s",
)

try:
    app = create_app()
except (ConfigError, KeysFileError) as error:
    logging.getLogger("wsgi").critical("cannot start: %s", error)
    sys.exit(1)
