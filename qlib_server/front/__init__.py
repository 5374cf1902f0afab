"""The front: what clients talk to.

``handler`` is the Flask-SocketIO app (gevent) and wires the rest: ``listener`` takes each request to the
result cache, a waiting list or a task; ``responder`` takes each result back to every waiting client;
``status`` serves the status page (``static/status.html``); ``transfer`` streams feature rows out of a
dataset cache (``POST /features``). The front imports ``state``, ``broker`` and the top-level modules,
never ``worker``: it meets the workers only through the broker, Redis and the dataset caches on disk.
"""
