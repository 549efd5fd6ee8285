"""One engine per replica: the models live in one process; HTTP workers reach it over a Unix socket.

- process.py: the engine process (`python -m vecshim.engine`)
- channel.py: the framing both ends speak
- proxy.py: the worker-side models (`RemoteModel`) and connection (`EngineLink`)
- supervisor.py: the gunicorn master's side (start, restart, reload, stop)
"""
