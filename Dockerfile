# The Kiln binaries in one image: `kiln`, `kiln-scheduler` and `kiln-worker` (infra/compose.yaml runs
# the scheduler and a worker from it). Built with the `dist` profile: release code, debug info
# stripped (the worker is 76 MB instead of 450).
#
#   docker build -t kiln .
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --locked --profile dist --bin kiln --bin kiln-scheduler --bin kiln-worker

FROM debian:bookworm-slim
# The Vulkan loader and Mesa's drivers (a GPU's own, or lavapipe on the CPU); curl for health checks.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl libvulkan1 mesa-vulkan-drivers \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --home-dir /var/lib/kiln --shell /usr/sbin/nologin kiln \
 && install -d -o kiln -g kiln -m 0750 /var/lib/kiln /var/lib/kiln-worker
COPY --from=build /src/target/dist/kiln /src/target/dist/kiln-scheduler /src/target/dist/kiln-worker /usr/local/bin/
USER kiln
ENV KILN_DATA_DIR=/var/lib/kiln
EXPOSE 7878
CMD ["kiln-scheduler"]
