"""A worker that loads this module dies while it boots, as a crash would (not an import error)."""

import os

os._exit(1)
