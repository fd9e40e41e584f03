# An S3 server (moto's), a stand-in for MinIO in infra/podman/compose.local.yaml (MinIO is neither
# pullable here nor packaged by Debian). moto keeps objects in memory: infra/podman/s3_server.py
# saves them to the volume at /data when the container stops and puts them back when it starts.
# It accepts any credentials. Build from the repository root.
ARG BASE_IMAGE=localhost/vae-pipeline-base:bookworm
FROM ${BASE_IMAGE}
ENV PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY constraints.txt /tmp/constraints.txt
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install -c /tmp/constraints.txt "moto[server]" boto3
COPY infra/local_stack.py infra/podman/s3_server.py /opt/s3/
# no VOLUME: compose mounts the `minio` volume at /data, and minio-init (this image too) needs none
EXPOSE 9000
ENTRYPOINT ["python", "/opt/s3/s3_server.py"]
CMD ["serve", "--port", "9000", "--data", "/data"]
