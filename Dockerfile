# chatnode: a small image running `chatnode run` as a non-root user, data on a volume.
# Build:  docker build -t chatnode .
# Run:    docker run -p 8080:8080 -p 8080:8080/udp -v chatnode-data:/var/lib/chatnode chatnode
FROM python:3.11-slim AS build
WORKDIR /src
COPY setup.cfg pyproject.toml README.md ./
COPY crdt ./crdt
COPY chatnode ./chatnode
RUN pip install --no-cache-dir --prefix=/install .

FROM python:3.11-slim
RUN groupadd --system chatnode \
 && useradd --system --gid chatnode --home-dir /var/lib/chatnode --shell /usr/sbin/nologin chatnode \
 && mkdir -p /var/lib/chatnode \
 && chown chatnode:chatnode /var/lib/chatnode
COPY --from=build /install /usr/local
USER chatnode
ENV CHATNODE_HOST=0.0.0.0 \
    CHATNODE_PORT=8080 \
    CHATNODE_DATA_DIR=/var/lib/chatnode \
    PYTHONUNBUFFERED=1
VOLUME ["/var/lib/chatnode"]
EXPOSE 8080/tcp 8080/udp
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s \
  CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2).status == 200 else 1)"
STOPSIGNAL SIGTERM
ENTRYPOINT ["chatnode"]
CMD ["run"]
