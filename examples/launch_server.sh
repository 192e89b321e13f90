#!/usr/bin/env bash
# Launch the SGLang server with LAVa KV-cache compression (--kv-policy lava).
#
#   examples/launch_server.sh                      # SmolLM2 on 127.0.0.1:30000
#   MODEL=/path/to/model PORT=8000 examples/launch_server.sh --kv-budget 0.1
#
# Extra arguments go to `python -m sglang.launch_server` after the ones below (a flag given
# twice: the last one wins; not --kv-policy none, with which the server refuses the --kv-*
# flags below: run `python -m sglang.launch_server` yourself for stock SGLang). Needs the
# lava-sglang environment (`source scripts/env.sh`).
set -euo pipefail

MODEL=${MODEL:-$(lava-sglang model)}   # default: the SmolLM2-135M checkpoint the project ships
PORT=${PORT:-30000}

args=(
    --model-path "$MODEL"
    --host 127.0.0.1 --port "$PORT"

    # The policy: lava (its default allocation, one budget threshold over all layers and KV
    # heads, measured best on documents scored by their repetition; docs/allocation.md), or
    # kvzip, snapkv, ada_snapkv, pyramidkv, streamingllm; none is stock SGLang (which refuses
    # the other --kv-* flags below: leave them out). The paper's LAVa:
    # lava:layer_budget=entropy,value_norm=true,pool_kernel=7. streamingllm scores nothing:
    # the --kv-observe-* flags are refused with it.
    --kv-policy lava

    # How much of a compressed document is kept: a keep ratio in (0, 1] (0.2 keeps 20% of its
    # KV rows, so ~5x as many documents fit), or an int >= 1, tokens kept per layer and KV head.
    # Lower saves more memory and costs more answer quality (docs/results/quality.md).
    --kv-budget 0.2

    # What gets compressed: `fork` (the document a frontend program adds before s.fork()),
    # `shared` (a prompt prefix that a second plain /generate or OpenAI request shares).
    # Use both when clients mix frontend programs and the OpenAI API. A shared prefix is
    # scored by its tail window, so with --kv-policy kvzip (scored by a repetition only)
    # pass --kv-compress-on fork.
    --kv-compress-on fork,shared

    # What scores a forked document: `reconstruct` (the default: the server repeats the
    # document, chunk by chunk, and keeps what the repetition attends to; query-agnostic, so
    # questions asked later find their facts), `tail` (its own last --kv-window tokens,
    # compressed as soon as it is committed) or `branches` (also the forked questions).
    # The forked questions of the first visit are answered on the full document meanwhile;
    # later ones read the compressed copy (docs/observe.md, docs/kvzip.md). The repetition
    # runs in chunks of --kv-observe-chunk tokens (512: the extra KV while a document is
    # scored is one chunk and its prompt); a document waits at most --kv-observe-wait seconds
    # (30) for its repetition to begin, then for each chunk while it progresses (one that
    # stalls is cut short, its partial scores unused). Those flags are read only under
    # reconstruct (and the wait under branches): given with --kv-observe tail, the server
    # refuses them.
    --kv-observe reconstruct

    # Prefixes shorter than this are kept whole (compressing a short prompt saves little).
    --kv-min-prefix 256

    # Recent window: the last N tokens of the document are always kept, and with a shared
    # prefix (scored by its own tail, as here) they score the others; it must be <
    # --kv-min-prefix. 32 is the default here; under --kv-observe reconstruct alone it is 8.
    --kv-window 32

    # Report cached tokens in OpenAI responses (usage.prompt_tokens_details.cached_tokens),
    # and export lava:* metrics (kept ratio, bytes saved, compression time) on /metrics.
    --enable-cache-report
    --enable-metrics
)

if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    # No GPU: SGLang's CPU engine, with the project's pure-PyTorch sgl_kernel stand-in where
    # the real one does not load (development and CI plumbing, see the README).
    # Assigned first: set -e stops here if the helper fails (an `eval "$(...)"` would not).
    cpu_exports=$(python - <<'PY'
import os, shlex
from lava_sglang.sglang_plugin.cpu_engine import cpu_engine_env
env = cpu_engine_env({"PYTHONPATH": os.environ.get("PYTHONPATH", "")})
print("\n".join(f"export {k}={shlex.quote(v)}" for k, v in env.items() if v))
PY
)
    eval "$cpu_exports"
    # The KV pool must be capped on CPU (SGLang's default would reserve most of the RAM);
    # fp32 makes the CPU engine's greedy answers match HF transformers token for token.
    args+=(--device cpu --attention-backend torch_native --sleep-on-idle --max-total-tokens 16384
           --dtype float32)
fi

exec python -m sglang.launch_server "${args[@]}" "$@"
