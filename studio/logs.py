"""Logging set-up for the studio process: one format, and third-party noise filtered once at start-up.

Noise = messages that say nothing actionable to a studio user, e.g. bitsandbytes' "Failed to load CPU
gemm_4bit_forward from kernels-community: No module named 'kernels'" (an optional speed-up we do not ship; the
built-in CPU path is used). Each is replaced by one INFO line the first time it appears.
"""

from __future__ import annotations

import logging

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# (logger name, text in the message, the one line logged instead)
NOISE = (
    (
        "bitsandbytes",
        "kernels-community",
        "bitsandbytes: the optional 'kernels' package is not installed; its built-in CPU 4-bit path is used",
    ),
)


class NoiseFilter(logging.Filter):
    """Drops a known noisy message; the first time, logs its short replacement instead."""

    def __init__(self, text: str, replacement: str) -> None:
        super().__init__()
        self.text, self.replacement, self.seen = text, replacement, False

    def filter(self, record: logging.LogRecord) -> bool:
        if self.text not in record.getMessage():
            return True
        if not self.seen:
            self.seen = True
            logging.getLogger("studio.logs").info(self.replacement)
        return False


def setup_logging(level: int = logging.INFO) -> None:
    """Configure the root logger once and install the noise filters (idempotent)."""
    logging.basicConfig(level=level, format=FORMAT)
    for name, text, replacement in NOISE:
        logger = logging.getLogger(name)
        if not any(isinstance(f, NoiseFilter) and f.text == text for f in logger.filters):
            filt = NoiseFilter(text, replacement)
            logger.addFilter(filt)
            for handler in logging.getLogger().handlers:  # child loggers' records skip parent logger filters
                handler.addFilter(filt)
