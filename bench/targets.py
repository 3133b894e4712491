"""Every target a benchmark is held to, in one place (``python -m bench.run`` exits 1 when one is missed)."""

# proxy: fast backend, side by side with nginx in the same run.
GATEWAY_VS_NGINX_RPS = 0.65
# proxy: in front of a real mlflow models serve (medians of per-round paired differences).
MLFLOW_ADDED_P50_MS = 0.25
MLFLOW_THROUGHPUT_VS_DIRECT = 0.98
# instructions: with a baseline revision, the current tree may cost this much more per request.
INSTRUCTIONS_VS_BASELINE = 1.10
# switching: admin answer → every replica on the new generation, with pub/sub.
PROPAGATION_P99_MS = 10.0
# switching: without pub/sub, bounded by the poll interval (1 s) plus a little.
PROPAGATION_POLL_ONLY_MAX_MS = 1250.0
# switching: flips under load drop nothing, over at least this many requests.
ZERO_DROP_MIN_REQUESTS = 20_000
# reaction: fault onset → route on previous, default guard at 200 req/s.
REACTION_P50_SECONDS = 2.0
# memory: gateway under load with switches.
MEMORY_MAX_RSS_MB = 80.0
MEMORY_MAX_GROWTH_MB = 2.0
# services: 200 services × 2 deployments on one gateway.
SERVICES_CPU_VS_ONE = 1.05
SERVICES_IDLE_RSS_MB = 100.0
SERVICES_POLL_LOOP_MS_PER_S = 5.0
# replicas: N latency-bound replicas at 2N connections serve at least this share of N × one replica.
REPLICAS_SCALING = 0.95
# replicas: one of four replicas 10x slower; least-request's p99 at most this share of round-robin's.
REPLICAS_SLOW_P99_RATIO = 0.5
# replicas: gateway CPU per request with 8 replicas against 1.
REPLICAS_CPU_8_VS_1 = 1.05
# canary: instructions per request through a 50/50 split with sticky hashing against a plain route.
CANARY_SPLIT_CPU_RATIO = 1.10
# canary: candidate starts failing → every gateway replica on weight 0, default guard at 200 req/s.
CANARY_ABORT_P50_SECONDS = 2.0
# shadow: 100 % copied to a fast shadow against no shadow, side by side (added p50 at 1 connection,
# throughput at 32).
SHADOW_ADDED_P50_MS = 0.1
SHADOW_THROUGHPUT_VS_OFF = 0.9
# shadow: 100 % copied to a frozen shadow (SIGSTOP): throughput against no shadow, gateway RSS growth over the load.
SHADOW_FROZEN_THROUGHPUT_VS_OFF = 0.95
SHADOW_FROZEN_RSS_GROWTH_MB = 20.0
