# One image for the gateway and both workers (compose.yaml picks the role by command).
# CUDA comes from the PyTorch wheel; the host needs the NVIDIA driver and container toolkit.
FROM python:3.12-slim

ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 \
    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
WORKDIR /opt/glmserve

RUN pip install "torch==2.11.*" "triton==3.6.*"
COPY pyproject.toml README.md ./
COPY protos ./protos
COPY common ./common
COPY gateway ./gateway
COPY prefill_worker ./prefill_worker
COPY decode_worker ./decode_worker
RUN pip install ".[gpu]"

EXPOSE 30000 30001 30002 30010
CMD ["glmserve", "--help"]
