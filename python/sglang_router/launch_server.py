"""python3 -m sglang_router.launch_server [flags]: workers and the router.

    python3 -m sglang_router.launch_server --model-path M --dp-size 4 --host 0.0.0.0 --port 30000

Takes SGLang's command line, as SGLang's own launch_server does: the server
flags (--model-path, --dp-size, --host, --port, --tp-size ...) and the
router's flags with a --router- prefix (--router-policy cache_aware,
--router-dp-worker-base-port 31000 ...). This process becomes
`sglr launch`: it starts --dp-size workers with python3 -m
sglang.launch_server (this Python), each with the server flags, --port of
its own and --base-gpu-id rank * tp-size, then the router on --host:--port.
"""

import shlex
import subprocess
import sys

from sglang_router import _sglr

# SGLang server flags that sglr launch takes itself (the rest go to workers)
_DP_SIZE = ("--dp-size", "--dp", "--data-parallel-size")
_MODEL = ("--model-path", "--model")

HELP = """usage: python3 -m sglang_router.launch_server [SGLang server flags] [--router-FLAG ...]

Start --dp-size SGLang workers (python3 -m sglang.launch_server) and the sglr
router in front of them, as `sglr launch` (below) does. SGLang's flags:

  --model-path PATH           the model, for every worker
  --dp-size N                 number of workers (default: 1)
  --host HOST, --port PORT    the router's address; the workers listen on HOST too
  --router-FLAG ...           FLAG of the router or of sglr launch, e.g. --router-policy
                              round_robin, --router-dp-worker-base-port 31000
  anything else               passed to every worker (--tp-size 2, --mem-fraction-static 0.8 ...)

"""


def is_flag(word):
    if not word.startswith("-") or word == "-":
        return False
    try:
        float(word)
        return False
    except ValueError:
        return True


def translate(argv):
    """`sglr launch` arguments for an SGLang launch_server command line."""
    launch, router, worker = [], [], []
    host = None
    worker_cmd = False
    dest = worker
    i = 0
    while i < len(argv):
        word = argv[i]
        if not is_flag(word):
            dest.append(word)
            i += 1
            continue
        name, eq, inline = word.partition("=")
        values = [inline] if eq else []
        if not eq:
            while i + 1 < len(argv) and not is_flag(argv[i + 1]):
                i += 1
                values.append(argv[i])
        i += 1
        if name in _DP_SIZE:
            launch += ["--dp-size"] + values
        elif name in _MODEL:
            launch += ["--model-path"] + values
        elif name == "--host":
            host = values[-1] if values else host
            router += ["--host"] + values
        elif name == "--port":
            router += ["--port"] + values
        elif name == "--router-dp-worker-base-port":
            launch += ["--worker-base-port"] + values
        elif name.startswith("--router-"):
            flag = "--" + name[len("--router-"):]
            worker_cmd = worker_cmd or flag == "--worker-cmd"
            router += [flag] + values
        else:
            worker += [name] + values
    if not worker_cmd and "--model-path" not in launch:
        sys.stderr.write("launch_server: the following arguments are required: --model-path\n")
        sys.exit(2)
    if host is not None:
        launch += ["--worker-host", host]
    if not worker_cmd:
        # the workers run on this Python, which has sglang (python3 on PATH may not)
        launch += ["--worker-cmd", shlex.quote(sys.executable) + " -m sglang.launch_server"
                   " --model-path {model} --host {host} --port {port} --base-gpu-id {gpu}"]
    args = launch + router
    if worker:
        args += ["--"] + worker
    return args


def launch_server(argv=None):
    """Run `sglr launch` in place of this process; does not return."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if "-h" in argv or "--help" in argv:
        sys.stdout.write(HELP)
        sys.stdout.flush()
        subprocess.call([_sglr.binary(), "launch", "--help"])
        sys.exit(0)
    _sglr.exec_sglr("launch", translate(argv))


def main():
    launch_server()


if __name__ == "__main__":
    main()
