"""gunicorn settings equal to `vecshim serve`'s, for running gunicorn directly:

    VECSHIM_CONFIG=/etc/vecshim/config.yaml \\
        gunicorn -c deploy/gunicorn.conf.py 'vecshim.app:create_app()'

The same process model as `vecshim serve`: one HTTP worker per CPU (at least 2) plus one engine
process, started and supervised by the gunicorn master (the hooks below), that
holds the models and rerankers once. `VECSHIM_ENGINE` (auto|on|off) and
`VECSHIM_WORKERS` (or `-w`) choose it as `--engine` and `--workers` do: with
one worker, `auto` keeps the models inside that worker. The engine reads the
config from `VECSHIM_CONFIG`, so name it there, not as `create_app`'s argument.
"""
import os

from vecshim.server import DEFAULTS, HOOKS, logconfig_for, plain_gunicorn_env, prepare_metrics_dir, remove_metrics_dir

# VECSHIM_* checked first: a bad value stops gunicorn with one line, not a traceback.
_env = plain_gunicorn_env()
# Before any worker imports prometheus_client: one folder shared by all workers.
_metrics_dir = prepare_metrics_dir()

bind = _env["bind"]
workers = _env["workers"]
worker_class = DEFAULTS["worker_class"]
threads = DEFAULTS["threads"]
keepalive = DEFAULTS["keepalive"]          # above Go's 90 s idle reuse
timeout = DEFAULTS["timeout"]
graceful_timeout = DEFAULTS["graceful_timeout"]
preload_app = False
accesslog = None                           # the app logs each request in its own format
logger_class = DEFAULTS["logger_class"]    # so gunicorn builds no access line of its own
errorlog = "-"
# The master's lines in the same format (text or JSON, `logging:` of the config) as the workers'.
logconfig_dict = logconfig_for(os.environ.get("VECSHIM_CONFIG"))
control_socket_disable = True
max_requests = _env["max_requests"]       # worker recycling, 0 = off
max_requests_jitter = _env["max_requests_jitter"]

post_fork = HOOKS["post_fork"]
post_worker_init = HOOKS["post_worker_init"]
worker_exit = HOOKS["worker_exit"]
child_exit = HOOKS["child_exit"]
on_starting = HOOKS["on_starting"]         # starts the engine before the first worker
on_reload = HOOKS["on_reload"]             # HUP: a new engine, ready, before the new workers


def on_exit(server):
    """After the workers drained: stop the engine, then remove the metrics folder this config created."""
    HOOKS["on_exit"](server)
    remove_metrics_dir(_metrics_dir)
