# Qlib-Server image: one image for every role; the compose file picks the modules per service.
#   docker build -t qlib-server .
#   docker run -v qlib-data:/data -v $PWD/deploy/config.yaml:/etc/qlib-server/config.yaml:ro -p 9710:9710 qlib-server
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# libgomp1: the OpenMP runtime some of pyqlib's dependencies load; every Python package is a wheel.
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgomp1 \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/qlib-server
COPY pyproject.toml README.md ./
COPY qlib_server ./qlib_server
RUN pip install . && rm -rf build

# Run as an unprivileged user; /data (the Qlib dataset and its caches) belongs to it, so a fresh named
# volume mounted there is writable.
RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/qlib qlib \
 && mkdir -p /data /etc/qlib-server \
 && chown qlib:qlib /data
USER qlib
WORKDIR /home/qlib

EXPOSE 9710
# SIGTERM drains: requests in flight are answered, workers finish the task in hand.
STOPSIGNAL SIGTERM
CMD ["qlib-server", "serve", "-c", "/etc/qlib-server/config.yaml"]
