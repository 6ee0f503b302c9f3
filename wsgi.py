"""The application object for `gunicorn wsgi:app`."""

import logging
import os
import sys

from app import create_app
from config import ConfigError
from keys import KeysFileError

# Everything the proxy writes (usage.sqlite, access.log and its backups,
# uploads) holds students' data: readable by the owner only.
os.umask(0o077)

logging.basicConfig(
    level=os.environ.get("LOG_LEVEL", "INFO").upper(),
    format="%(asctime)s %(levelname)s %(name)s: %(message)s",
)

try:
    app = create_app()
except (ConfigError, KeysFileError) as error:
    logging.getLogger("wsgi").critical("cannot start: %s", error)
    sys.exit(1)
