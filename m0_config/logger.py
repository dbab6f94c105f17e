"""The project's loggers: `init_logger(__name__)` gives a logger under "folovllm" that prints INFO
and above to stderr (start-up facts such as the number of KV-cache blocks), like vLLM's."""

from __future__ import annotations

import logging

_ROOT = "folovllm"


def _configure_root() -> logging.Logger:
    root = logging.getLogger(_ROOT)
    if not root.handlers:  # once per process, whatever imports first
        handler = logging.StreamHandler()
        handler.setFormatter(
            logging.Formatter("%(levelname)s %(asctime)s [%(name)s] %(message)s", "%H:%M:%S")
        )
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        root.propagate = False
    return root


def init_logger(name: str) -> logging.Logger:
    _configure_root()
    return logging.getLogger(f"{_ROOT}.{name}")
