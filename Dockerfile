# Build and run Hearth. Multi-stage: the runtime image holds only the binary.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin hearth

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 hearth && mkdir /data && chown hearth /data
COPY --from=build /src/target/release/hearth /usr/local/bin/hearth
USER hearth
WORKDIR /data
EXPOSE 1234
ENV HEARTH_LISTEN=0.0.0.0:1234
# asks GET /healthz on HEARTH_LISTEN (whatever it is set to), on loopback
HEALTHCHECK --interval=10s --timeout=3s CMD ["/usr/local/bin/hearth", "health"]
ENTRYPOINT ["/usr/local/bin/hearth"]
