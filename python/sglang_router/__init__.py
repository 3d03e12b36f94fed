"""sglang_router for sglr: the SGLang router's Python entry points, running
the sglr binary.

    python3 -m sglang_router.launch_router --worker-urls http://w1:8000 ...
    python3 -m sglang_router.launch_server --model-path M --dp-size 4 ...
    from sglang_router import Router, PolicyType
"""

from sglang_router.router import PolicyType, Router

try:
    from sglang_router._install import VERSION as __version__
except ImportError:
    __version__ = "0+source"

__all__ = ["Router", "PolicyType"]
