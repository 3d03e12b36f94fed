"""python3 -m sglang_router.launch_router [flags]: the router alone.

    python3 -m sglang_router.launch_router --worker-urls http://w1:8000 http://w2:8000

The flags are the SGLang router's (`--help` lists them); this process
becomes `sglr run` with them, so its pid, signals and exit status are the
router's.
"""

import sys

from sglang_router import _sglr


def launch_router(args=None):
    """Run the router in place of this process; does not return.

    args: the command line's words (default: sys.argv[1:]), or an object
    whose attributes are router settings (an argparse.Namespace, SGLang's
    RouterArgs), as SGLang's launch_router(args) takes them."""
    if args is None:
        args = sys.argv[1:]
    elif not isinstance(args, (list, tuple)):
        args = _sglr.router_flags(vars(args))
    _sglr.exec_sglr("run", list(args))


def main():
    launch_router()


if __name__ == "__main__":
    main()
