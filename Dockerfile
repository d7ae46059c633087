# Multi-stage build: compile with the Rust toolchain, run on slim Debian as a non-root user.
# The build context is the checkout minus what .dockerignore leaves out: cargo reads every
# target Cargo.toml names (benches/ included) before it compiles anything.
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked && strip target/release/smartrelay

FROM debian:bookworm-slim
# ca-certificates unpinned on purpose: it must follow Debian's security updates.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /var/lib/smartrelay --shell /usr/sbin/nologin smartrelay \
 && mkdir -p /var/lib/smartrelay /etc/smartrelay \
 && chown smartrelay /var/lib/smartrelay
COPY --from=build /src/target/release/smartrelay /usr/local/bin/smartrelay
COPY config/production.example.toml /etc/smartrelay/smartrelay.toml
# The smartrelay user, by number: resolvable whatever the host's passwd says.
USER 10001
WORKDIR /var/lib/smartrelay
# SMTP (map the host's port 25 here: a non-root process cannot bind it), implicit TLS,
# and the admin API/dashboard/metrics.
EXPOSE 2525 4650 8025
VOLUME ["/var/lib/smartrelay"]
# /dev/tcp is bash's (Debian's /bin/sh, dash, has no such thing); /healthz answers "ok".
HEALTHCHECK --interval=30s --timeout=5s CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/8025 && printf 'GET /healthz HTTP/1.0\\r\\n\\r\\n' >&3 && grep -q '^ok' <&3"]
# SIGTERM drains (readiness 503, new connections 421) for server.drain_delay, then stops
# within server.shutdown_timeout + 5 s: give `docker stop -t` at least their sum.
STOPSIGNAL SIGTERM
ENTRYPOINT ["smartrelay"]
CMD ["run", "--config", "/etc/smartrelay/smartrelay.toml"]
