# fracture-triage: one image for every role (scp, worker, sweeper, db upgrade).
# Build: docker build -t fracture-triage .            (add --build-arg WITH_DCMTK=0 to skip dcmtk)
FROM python:3.11-slim

# dcmtk is optional: its echoscu/storescu/dsrdump are handy inside the container for checks.
ARG WITH_DCMTK=1
RUN if [ "$WITH_DCMTK" = "1" ]; then \
        apt-get update \
        && apt-get install -y --no-install-recommends dcmtk \
        && rm -rf /var/lib/apt/lists/*; \
    fi

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY fracture_triage ./fracture_triage
COPY dicom_node ./dicom_node
COPY worker ./worker
COPY model ./model
COPY db ./db
COPY api ./api
# A plain install: the shipped model (card + LiteRT export) is package data, and the node
# needs no TensorFlow (training is the [train] extra, not part of this image).
RUN pip install . && cd / && rm -rf /src

RUN useradd --system --uid 10001 --user-group --home-dir /data triage \
    && mkdir -p /data \
    && chown triage:triage /data
USER triage
WORKDIR /data

# In a container the SCP listens on every interface; the port is published by compose.
ENV FRACTURE_TRIAGE_DATA_DIR=/data \
    FRACTURE_TRIAGE_BIND_ADDRESS=0.0.0.0
VOLUME ["/data"]
EXPOSE 11112 8080

ENTRYPOINT ["fracture-triage"]
CMD ["scp"]
