"""The Router class of SGLang's Python binding, running sglr.

    from sglang_router import Router, PolicyType

    router = Router(worker_urls=["http://w1:8000", "http://w2:8000"],
                    policy=PolicyType.CacheAware)
    router.start()          # blocks until the router stops
"""

import enum
import signal
import subprocess
import threading

from sglang_router import _sglr


class PolicyType(enum.Enum):
    """Routing policies, as sglang_router_rs.PolicyType names them."""

    Random = "random"
    RoundRobin = "round_robin"
    CacheAware = "cache_aware"
    PowerOfTwo = "power_of_two"

    @property
    def sglr_name(self):
        return self.value


class Router:
    """A router for distributing requests across workers: `sglr run` with
    these settings, in a child process that dies with this one.

    Args mirror the SGLang binding's: worker_urls, policy (a PolicyType or a
    policy name, or a path to a sglr policy file), host, port,
    worker_startup_timeout_secs, worker_startup_check_interval,
    cache_threshold, balance_abs_threshold, balance_rel_threshold,
    eviction_interval_secs, max_tree_size, max_payload_size, verbose,
    log_dir, log_level, dp_awareness, api_key, service_discovery, selector,
    service_discovery_port, service_discovery_namespace, prometheus_port,
    prometheus_host, pd_disaggregation, prefill_urls [(url, port)],
    decode_urls, prefill_policy, decode_policy, request_timeout_secs,
    max_concurrent_requests, cors_allowed_origins, retry_*, cb_*, health_*
    ... Every keyword is the `sglr run` flag of the same name (see
    `sglr run --help`); sglr checks them when the router starts. Defaults are
    the binding's (round robin on 127.0.0.1:3001), sglr's for the rest.
    """

    def __init__(self, worker_urls=None, policy=PolicyType.RoundRobin, host="127.0.0.1",
                 port=3001, **settings):
        self._settings = dict(worker_urls=list(worker_urls or []), policy=policy, host=host,
                              port=port)
        self._settings.update(settings)
        self._proc = None

    def flags(self):
        """The `sglr run` flags for these settings."""
        return _sglr.router_flags(self._settings)

    def start(self):
        """Start the router and block until it stops.

        SIGTERM (and Ctrl-C) stop it gracefully: it lets the requests in
        flight finish first. Raises RuntimeError when it could not start or
        stopped with an error."""
        self._proc = subprocess.Popen(_sglr.child_argv("run", self.flags()))
        forwarding = threading.current_thread() is threading.main_thread()
        previous = None
        if forwarding:
            previous = signal.signal(signal.SIGTERM, self._forward)
        try:
            while True:
                try:
                    code = self._proc.wait()
                    break
                except KeyboardInterrupt:
                    # the terminal sent SIGINT to the router too; let it drain
                    self._forward(signal.SIGINT, None)
        finally:
            if forwarding:
                signal.signal(signal.SIGTERM, previous)
        if code != 0:
            raise RuntimeError("sglr run exited with status %d" % code)

    def _forward(self, signum, _frame):
        if self._proc and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
