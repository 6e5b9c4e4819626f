# The qbgw image: one image for the migration, the emulator and the workers.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml alembic.ini README.md ./
COPY worker ./worker
COPY migrations ./migrations
RUN pip install --no-cache-dir -e . && useradd --create-home qbgw && mkdir -p /var/lib/qbgw && chown qbgw /var/lib/qbgw
USER qbgw
ENV QBGW_DATA_DIR=/var/lib/qbgw
CMD ["qbgw", "worker"]
