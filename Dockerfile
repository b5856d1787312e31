# The image Braid's Helm chart runs (head, workers, batch jobs): Ray with Braid and its
# embedded Countdown model. Not built in CI (no Docker engine there).
#   docker build -t ghcr.io/braid-project/braid:0.1.0 .
#   docker build --build-arg RAY_IMAGE=rayproject/ray:2.60.0-py311-gpu -t ghcr.io/braid-project/braid:0.1.0-gpu .
ARG RAY_IMAGE=rayproject/ray:2.60.0-py311-cpu
FROM ${RAY_IMAGE}
# CPU images take the CPU build of torch; GPU images the CUDA build from the default index.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
WORKDIR /app
COPY pyproject.toml README.md ./
COPY actors actors
COPY cache_service cache_service
COPY cluster cluster
COPY countdown countdown
COPY engine engine
RUN if echo "${RAY_IMAGE}" | grep -q gpu; then pip install --no-cache-dir torch==2.13.0; \
    else pip install --no-cache-dir --index-url "${TORCH_INDEX}" torch==2.13.0; fi \
    && pip install --no-cache-dir .
# Ray's working directory on every pod: `cluster.serve:build` and `cluster.job` import from here.
ENV PYTHONPATH=/app
# The engine's fused CPU decode step (engine/csrc) is compiled here, once, into the image
# user's ~/.cache/torch_extensions (g++; its hot loops are built for AVX-512, AVX2 and
# plain x86-64, picked at run time).
RUN sudo apt-get update -qq && sudo apt-get install -y -qq --no-install-recommends g++ \
    && sudo rm -rf /var/lib/apt/lists/* \
    && python -c "from engine.decode_step import extension; assert extension() is not None"
