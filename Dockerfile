# The fleet service, the CLI and the device agent (one image, several commands).
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
RUN useradd --system --uid 10001 --home-dir /var/lib/tillsyn --create-home tillsyn
WORKDIR /src
COPY pyproject.toml README.md ./
COPY tillsyn_protocol ./tillsyn_protocol
COPY fleet ./fleet
COPY firmware_agent ./firmware_agent
COPY broker ./broker
COPY tillsyn_cli ./tillsyn_cli
RUN pip install --no-cache-dir . && rm -rf /src
WORKDIR /var/lib/tillsyn
USER tillsyn
ENTRYPOINT ["tillsyn"]
CMD ["--help"]
