# TailGuard: the daemon with its eBPF programs, tailscaled and tailscale,
# and userspace WireGuard for hosts whose kernel has none.
#
# The bases are build arguments with public defaults, so the same file
# builds in production and on a machine without a registry (where
# `cargo xtask image` passes locally made bases and, for the smoke test,
# the Tailscale stand-in as TAILSCALE_IMAGE).
ARG BUILD_BASE=docker.io/library/debian:bookworm
ARG RUNTIME_BASE=docker.io/library/debian:bookworm-slim
ARG TAILSCALE_IMAGE=docker.io/tailscale/tailscale:stable

FROM ${TAILSCALE_IMAGE} AS tailscale

FROM ${BUILD_BASE} AS build
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl gcc libc6-dev \
 && apt-get clean && rm -rf /var/lib/apt/lists/* /var/cache/apt/*
ENV RUSTUP_HOME=/opt/rustup CARGO_HOME=/opt/cargo TAILGUARD_TOOLS_DIR=/opt/tailguard-tools \
    PATH=/opt/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
WORKDIR /src
COPY . .
# The toolchains the repository pins (stable for the daemon, a dated nightly
# and bpf-linker for the eBPF programs) come from the project's own setup;
# they live in build caches, so only the binary reaches the image.
RUN --mount=type=cache,target=/opt/rustup \
    --mount=type=cache,target=/opt/cargo \
    --mount=type=cache,target=/opt/tailguard-tools \
    --mount=type=cache,target=/src/target \
    if [ ! -x /opt/cargo/bin/rustup ]; then \
      curl -sSfL -o /tmp/rustup-init https://static.rust-lang.org/rustup/dist/x86_64-unknown-linux-gnu/rustup-init \
      && chmod +x /tmp/rustup-init \
      && /tmp/rustup-init -y --no-modify-path --profile minimal --default-toolchain none \
      && rm /tmp/rustup-init; \
    fi \
 && rustup toolchain install \
 && cargo xtask setup --toolchains-only \
 && cargo build --release --locked --package tailguard \
 && install -D target/release/tailguard /out/tailguard

FROM ${RUNTIME_BASE}
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# nftables: TailGuard's rule set; iptables, iproute2: tailscaled's firewall
# and routes; wireguard-go (with TUN offloads): WireGuard where the kernel
# has none, and wireguard-tools' `wg` to look at it; ca-certificates:
# tailscaled reaching its control server. On Debian 12 wireguard-go comes
# from bookworm-backports, on the mirror the base image's own apt sources
# give for bookworm (the rule of xtask/src/backports.rs); later releases
# have it in their own suite.
# hadolint ignore=DL3008,SC2016
RUN . /etc/os-release \
 && backports=() \
 && case "${ID:-}:${VERSION_CODENAME:-}:${VERSION_ID:-}" in \
      debian:bookworm:* | debian::12) \
        archive="$(apt-get indextargets --no-release-info --format '$(TARGET_OF) $(RELEASE) $(REPO_URI)' \
          | awk '$1 == "deb" && $2 == "bookworm" && archive == "" { archive = $3 } END { print archive }')" \
        && if [ -z "$archive" ]; then \
             echo "no deb source for bookworm in the base image's /etc/apt/sources.list or /etc/apt/sources.list.d/ (*.list, *.sources): cannot add bookworm-backports" >&2; \
             exit 1; \
           fi \
        && printf 'Types: deb\nURIs: %s\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' "$archive" \
          > /etc/apt/sources.list.d/tailguard-bookworm-backports.sources \
        && backports=(-t bookworm-backports) ;; \
    esac \
 && apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates iproute2 iptables nftables \
 && apt-get install -y --no-install-recommends "${backports[@]}" wireguard-go wireguard-tools \
 && apt-get clean && rm -rf /var/lib/apt/lists/* /var/cache/apt/*
COPY --from=tailscale /usr/local/bin/tailscaled /usr/local/bin/tailscale /usr/local/bin/
COPY --from=build /out/tailguard /usr/local/bin/tailguard
VOLUME ["/etc/wireguard", "/tailguard/state"]
EXPOSE 41641/udp
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 CMD ["tailguard", "health"]
ENTRYPOINT ["tailguard"]
CMD ["run"]
