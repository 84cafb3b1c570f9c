#!/usr/bin/env bash
# The wheels the GPU image lacks, fetched here (a machine that reaches a package index) for the GPU machine's
# Python 3.12 on x86_64, into DIR. Carry DIR to the GPU run: `bash benchmarks/gpu_proof.sh --wheels DIR OUT`,
# and the device tool's `carry: ["DIR"]` (BENCHMARKS.md, "The GPU proof").
#
#   bash benchmarks/gpu_wheels.sh .whl       # DIR: absent, empty or holding only wheels; /.whl/ is git-ignored
#   bash benchmarks/gpu_wheels.sh --list     # the pinned set, one NAME==VERSION a line, nothing fetched
#
# The GPU image has torch 2.11+cu130, triton 3.6, transformers 5.17, peft, accelerate, safetensors, tokenizers,
# numpy, pandas, pyarrow, fsspec, xxhash, huggingface-hub, requests, pyyaml, filelock, tqdm, packaging, psutil,
# ninja, msgpack, py-cpuinfo, einops and typing-extensions. It lacks deepspeed and what deepspeed needs beyond
# that (hjson, pydantic with pydantic-core, annotated-types and typing-inspection), and datasets with what it needs
# beyond that (dill, multiprocess), and bitsandbytes (the QLoRA peer of the proof's nf4 stage: its wheel carries
# its own CUDA kernels, 41 MiB of the set's 47). flash-attn is not carried: a CUDA build for that torch cannot be made here, and
# the proof uses sdpa. The versions are those of the project's CPU environment, where they run together; nothing
# the image already has is carried (pydantic 2.14 needs typing-extensions >= 4.16 from it: stage 1 of the proof
# lists any declared requirement the image does not meet).
set -euo pipefail

PYTHON="${PYTHON:-python3}"
# DeepSpeed publishes only a source package: built here into a wheel, pure Python (DS_BUILD_OPS unset: its C++/CUDA
# ops are compiled where they are first used; the proof's runs use none on a GPU: torch AdamW, no offload of the
# optimizer).
BUILT=(deepspeed==0.19.8)
BINARY=(hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
        datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 bitsandbytes==0.50.2)
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64)

die() { echo "gpu_wheels.sh: error: $*" >&2; exit 2; }

case "${1:-}" in
    --list) [ $# -eq 1 ] || die "--list takes no other argument"; printf '%s\n' "${BUILT[@]}" "${BINARY[@]}"; exit 0 ;;
    -h|--help) sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    "") die "expected DIR, the folder for the wheels (e.g. .whl), or --list" ;;
    -*) die "$1: unknown option (expected DIR or --list)" ;;
esac
[ $# -eq 1 ] || die "expected one DIR, got $# arguments"
DIR="${1%/}"
if [ -e "$DIR" ]; then
    [ -d "$DIR" ] || die "DIR $DIR: exists and is not a directory"
    others=$(find "$DIR" -mindepth 1 -not -name '*.whl' | head -1)
    [ -z "$others" ] || die "DIR $DIR: holds $others, not only wheels (this script replaces the folder)"
fi
command -v "$PYTHON" >/dev/null || die "PYTHON=$PYTHON: not found"

# Everything lands in a temporary sibling first; DIR is replaced only once the whole set is there, fsynced.
TMP=$(mktemp -d "$DIR.tmp-XXXXXX")
trap 'rm -rf "$TMP" "$DIR.old-$$"' EXIT
"$PYTHON" -m pip wheel -q --no-deps --wheel-dir "$TMP" "${BUILT[@]}"
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    $(printf -- '--platform %s ' "${PLATFORMS[@]}") --dest "$TMP" "${BINARY[@]}"
got=$(find "$TMP" -maxdepth 1 -name '*.whl' | wc -l)
want=$(( ${#BUILT[@]} + ${#BINARY[@]} ))
[ "$got" -eq "$want" ] || die "fetched $got wheels, expected $want (one per pinned package): $(ls "$TMP")"
sync "$TMP"/*.whl
[ -d "$DIR" ] && mv "$DIR" "$DIR.old-$$"
mv "$TMP" "$DIR"
sync "$(dirname "$DIR")"
ls -l "$DIR"
du -sh "$DIR"
