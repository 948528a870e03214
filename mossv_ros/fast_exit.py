# Copyright 2026 The mossv_ros authors
# SPDX-License-Identifier: Apache-2.0
"""Entry points that end the process as soon as the command's own shutdown is done.

Once a command has returned (the node's final answers published and its engine stopped, the
ROS context shut down, files written), what remains is the interpreter tearing down torch,
transformers and the ROS libraries: 1-8 s on a busy machine (measured in
``bench/bench_shutdown.py``), during which a robot's launch system waits. So the process
flushes its output and leaves with ``os._exit``. A SIGINT at any moment, while the command
still imports torch included, ends it with exit code 130 and no traceback.

Pure Python, imported before anything heavy.
"""
import importlib
import logging
import os
import sys
from typing import NoReturn, Optional, Sequence


def exit_now(code: int) -> NoReturn:
    """Flush stdout, stderr and the logging handlers, then end the process with ``code``
    (no interpreter teardown: nothing the commands need runs there)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):
            pass
    try:
        logging.shutdown()
    except Exception:  # noqa: BLE001 - a broken handler must not keep the process alive
        pass
    os._exit(code)


def run_and_exit(module: str, function: str = 'main',
                 argv: Optional[Sequence[str]] = None) -> NoReturn:
    """Import ``module`` and run ``function`` (``argv`` given when not None), then
    :func:`exit_now` with its return code (0 for None); a KeyboardInterrupt anywhere, the
    import included, exits 130 without a traceback."""
    try:
        entry = getattr(importlib.import_module(module), function)
        code = entry() if argv is None else entry(list(argv))
        code = int(code or 0)
    except KeyboardInterrupt:
        code = 130
    except SystemExit as exc:  # argparse's --help and usage errors
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
        if exc.code is not None and not isinstance(exc.code, int):
            print(exc.code, file=sys.stderr)
    exit_now(code)


def cli() -> NoReturn:
    """The ``mossv-ros`` console script."""
    run_and_exit('mossv_ros.cli')


def assistant_node() -> NoReturn:
    """``ros2 run mossv_ros assistant_node`` and the launch file's executable."""
    run_and_exit('mossv_ros.ros.main')
