"""Finding the sglr binary and turning Python settings into its flags.

Standard library only: this package is installed by `make install`, on
machines where PyPI is out of reach.
"""

import os
import shutil
import sys

# The parent-death trampoline of the sglr binary (core/child.c): the command
# it runs is killed (signal 9) when the Python process that started it dies.
_TRAMPOLINE = "--exec-child"
_SIGKILL = 9


def binary():
    """Path of the sglr binary: $SGLR_BIN, else the one installed beside this
    package by `make install` (found relative to the package first, so a
    tree staged with DESTDIR works too), else sglr on PATH."""
    env = os.environ.get("SGLR_BIN")
    if env:
        return env
    candidates = []
    try:
        from sglang_router import _install
        here = os.path.dirname(os.path.abspath(__file__))
        candidates.append(os.path.normpath(os.path.join(here, _install.BIN_FROM_PACKAGE)))
        candidates.append(_install.BIN)
    except ImportError:
        pass
    for path in candidates:
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    found = shutil.which("sglr")
    if found:
        return found
    sys.stderr.write("sglang_router: cannot find the sglr binary (set SGLR_BIN to its path)\n")
    sys.exit(127)


def exec_sglr(command, args):
    """Replace this process with `sglr COMMAND ARGS...` (as SGLang's launchers
    run the router in the process that was started)."""
    path = binary()
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(path, [path, command] + [str(a) for a in args])


def child_argv(command, args):
    """argv that runs `sglr COMMAND ARGS...` as a child dying with us."""
    path = binary()
    return [path, _TRAMPOLINE, str(os.getpid()), str(_SIGKILL), path, command] + [str(a) for a in args]


# Python setting names that are not the flag name with '_' turned into '-'
_FLAG_NAMES = {
    "eviction_interval_secs": "--eviction-interval",
    "dp_awareness": "--dp-aware",
    "prefill_urls": "--prefill",
    "decode_urls": "--decode",
}


def router_flags(settings):
    """Flags of `sglr run` for a mapping of Router / RouterArgs settings.

    None and False are left out (sglr's default applies); True is a switch;
    a list or tuple is the flag followed by its items; a dict is key=value
    words (label selectors); prefill_urls is [(url, bootstrap_port or
    None)], each its own --prefill; decode_urls one --decode each; verbose
    means --log-level debug; a policy may be a PolicyType or its name."""
    flags = []
    for key, value in settings.items():
        if value is None or value is False or key.startswith("_"):
            continue
        if key == "verbose":
            flags += ["--log-level", "debug"]
            continue
        flag = _FLAG_NAMES.get(key) or "--" + key.replace("_", "-")
        if key == "prefill_urls":
            for entry in value:
                url, port = (entry, None) if isinstance(entry, str) else (entry[0], entry[1])
                flags += [flag, url, "none" if port is None else str(port)]
        elif key == "decode_urls":
            for url in value:
                flags += [flag, url]
        elif value is True:
            flags.append(flag)
        elif isinstance(value, dict):
            if value:
                flags.append(flag)
                flags += ["%s=%s" % (k, v) for k, v in value.items()]
        elif isinstance(value, (list, tuple)):
            if value:
                flags.append(flag)
                flags += [str(v) for v in value]
        else:
            flags += [flag, _word(value)]
    return flags


def _word(value):
    name = getattr(value, "sglr_name", None)
    return name if name is not None else str(value)
