#!/usr/bin/env bash
# LoRA fine-tuning of Llama 3.1 under DeepSpeed ZeRO-3, launched with `deepspeed --hostfile`.
#
#   bash run-llama.sh [--config FILE] [extra training flags...]
#
# Environment (all optional):
#   MODEL        model directory (HF safetensors).     Default: the embedded tiny Llama, made on first use
#   DATA         .json/.jsonl/.parquet or HF dataset.  Default: the bundled tiny dataset (with --dataset_format chat
#                                                      and no DATA: the bundled tiny chat dataset)
#   OUTPUT_DIR   where adapters/checkpoints go.        Default: ./output
#   HOSTFILE     DeepSpeed hostfile.                   Default: hostfiles/localhost
#   DS_CONFIG    DeepSpeed JSON config.                Default: ds_configs/zero3.json
#   NPROC        ranks per node on a one-host file.    Default: all local GPUs, or 2 CPU ranks
#   MASTER_ADDR  rendezvous address (rank 0's node).   Default: 127.0.0.1 (one host), else the launcher's first
#                host (with NODE_RANK: required)
#   MASTER_PORT  rendezvous port (rank 0 listens).     Default: with every rank on this machine (local hosts,
#                no NODE_RANK) a free port, logged, so that two jobs do not collide; else 29500. One in use is
#                refused in one line: before launching (one node) or by rank 0 (several)
#   INCLUDE / EXCLUDE  the launcher's --include/--exclude filters (host:0,1@host2)
#   NODE_RANK    launch this node only, without ssh (start the same command on every node with
#                its NODE_RANK and the same MASTER_ADDR); unset: the launcher reaches the hosts by ssh/pdsh
#   MERGE_DIR    if set, merge the final adapters into a full checkpoint there after training
#   LLAMA_FT_CACHE  cache for the tiny model and compiled ops. Default: ~/.cache/llama-ft
#   LLAMA_FT_GPU_MEMORY_GB / LLAMA_FT_HOST_MEMORY_GB  memory the pre-launch plan assumes (GiB) instead of
#                nvidia-smi's / /proc/meminfo's; the GPU one also plans for GPUs on a machine without them
# Inside a Slurm job (SLURM_JOB_ID and SLURM_JOB_NODELIST set; started by srun, one task per node, as in
# hostfiles/slurm.sbatch) the unset ones of HOSTFILE, NODE_RANK, MASTER_ADDR and MASTER_PORT come from the job.
# Extra arguments are appended after the defaults, so they override them (last flag wins).
# --config FILE (YAML or JSON, keys named as the flags; llama_ft/config_file.py): its flags come after the
# defaults and before the other arguments, so the command line wins over the file and the file over the defaults;
# its model_name_or_path, dataset, output_dir and deepspeed stand in for MODEL, DATA, OUTPUT_DIR and DS_CONFIG
# when those are not set.
# Before launching, `llama-ft plan` checks that the run fits in GPU (or, for CPU ranks, host) memory and
# stops with its numbers when it does not (exit 1); `--force` launches anyway (it is not passed on to training).
# A long-context layout training would refuse (e.g. a --sequence_parallel_size the model's heads cannot be split
# over) stops it too, in one line (exit 2), --force or not.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-python}"
DEEPSPEED="${DEEPSPEED:-deepspeed}"
CACHE_DIR="${LLAMA_FT_CACHE:-$HOME/.cache/llama-ft}"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$CACHE_DIR/torch_extensions}"
export PYTHONPATH="$HERE${PYTHONPATH:+:$PYTHONPATH}"

die() { echo "run-llama.sh: error: $*" >&2; exit 2; }

# --config FILE: checked and turned into flags by `llama-ft config` (one line naming the file, line and key on
# bad input); the four paths the script itself needs are taken out of them.
CONFIG_FILE="" CONFIG_ARGS=() ARGS=()
while [ $# -gt 0 ]; do
    case "$1" in
        --config) [ $# -ge 2 ] || die "--config: expected a file (YAML or JSON)"; CONFIG_FILE=$2; shift 2 ;;
        --config=*) CONFIG_FILE=${1#--config=}; shift ;;
        *) ARGS+=("$1"); shift ;;
    esac
done
set -- ${ARGS[@]+"${ARGS[@]}"}
if [ -n "$CONFIG_FILE" ]; then
    CONFIG_OUT=$(mktemp) || die "--config: cannot create a temporary file (TMPDIR)"
    if ! "$PYTHON" -m llama_ft.cli config --nul "$CONFIG_FILE" >"$CONFIG_OUT"; then
        rm -f "$CONFIG_OUT"
        exit 2  # llama-ft config printed the one line
    fi
    mapfile -d '' -t RAW <"$CONFIG_OUT"
    rm -f "$CONFIG_OUT"
    for ((i = 0; i < ${#RAW[@]}; i++)); do
        case "${RAW[$i]}" in
            --model_name_or_path) MODEL=${MODEL:-${RAW[$((i + 1))]}}; i=$((i + 1)) ;;
            --dataset) DATA=${DATA:-${RAW[$((i + 1))]}}; i=$((i + 1)) ;;
            --output_dir) OUTPUT_DIR=${OUTPUT_DIR:-${RAW[$((i + 1))]}}; i=$((i + 1)) ;;
            --deepspeed)
                DS_CONFIG=${DS_CONFIG:-${RAW[$((i + 1))]}}; i=$((i + 1))
                # a bundled config named relative to the checkout, as training resolves it
                [ -f "$DS_CONFIG" ] || [ ! -f "$HERE/$DS_CONFIG" ] || DS_CONFIG="$HERE/$DS_CONFIG" ;;
            *) CONFIG_ARGS+=("${RAW[$i]}") ;;
        esac
    done
    echo "run-llama.sh: --config $CONFIG_FILE: ${#CONFIG_ARGS[@]} more flag words after the defaults" >&2
fi
OUTPUT_DIR="${OUTPUT_DIR:-./output}"
DS_CONFIG="${DS_CONFIG:-$HERE/ds_configs/zero3.json}"

if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
    NGPU=$(nvidia-smi -L | grep -c '^GPU')
else
    NGPU=0
fi

# A Slurm job: its hosts, GPUs per node and port, before the defaults below (explicit variables win).
SLURM_JOB=""
if [ -n "${SLURM_JOB_ID:-}" ] && [ -n "${SLURM_JOB_NODELIST:-}" ]; then
    SLURM_JOB="Slurm job $SLURM_JOB_ID"
    [[ "$SLURM_JOB_ID" =~ ^[0-9]+$ ]] || die "SLURM_JOB_ID=$SLURM_JOB_ID: expected a numeric job id"
    command -v scontrol >/dev/null || die "$SLURM_JOB: scontrol not on PATH; it expands" \
        "SLURM_JOB_NODELIST=$SLURM_JOB_NODELIST into host names (put Slurm's commands on PATH)"
    SCONTROL_STATUS=0
    SCONTROL_OUT=$(scontrol show hostnames "$SLURM_JOB_NODELIST" 2>/dev/null) || SCONTROL_STATUS=$?
    # on failure, once more for its message
    [ "$SCONTROL_STATUS" -eq 0 ] || die "$SLURM_JOB: 'scontrol show hostnames $SLURM_JOB_NODELIST' failed" \
        "(exit $SCONTROL_STATUS): $(scontrol show hostnames "$SLURM_JOB_NODELIST" 2>&1 >/dev/null | tail -1)"
    mapfile -t SLURM_HOSTS < <(echo "$SCONTROL_OUT" | awk 'NF {print $1}')
    [ "${#SLURM_HOSTS[@]}" -gt 0 ] || die "$SLURM_JOB: 'scontrol show hostnames $SLURM_JOB_NODELIST' printed no host"
    # 10000-19999: one port per job, so that two jobs sharing a node do not collide
    if [ -z "${MASTER_PORT:-}" ]; then MASTER_PORT=$((10000 + SLURM_JOB_ID % 10000)) MASTER_PORT_FROM="SLURM_JOB_ID"; fi
    if [ -z "${HOSTFILE:-}" ]; then
        # Ranks per node: the job's GPUs on this node, or the CPU default.
        if [ -n "${SLURM_GPUS_ON_NODE:-}" ] && [ "$SLURM_GPUS_ON_NODE" != 0 ]; then
            [[ "$SLURM_GPUS_ON_NODE" =~ ^[1-9][0-9]*$ ]] ||
                die "SLURM_GPUS_ON_NODE=$SLURM_GPUS_ON_NODE: expected a number of GPUs"
            SLOTS=$SLURM_GPUS_ON_NODE SLOTS_FROM=SLURM_GPUS_ON_NODE
        elif [ -n "${SLURM_GPUS_PER_NODE:-}" ]; then
            [[ "$SLURM_GPUS_PER_NODE" =~ ^([^:,]+:)*([1-9][0-9]*)$ ]] ||
                die "SLURM_GPUS_PER_NODE=$SLURM_GPUS_PER_NODE: expected N or TYPE:N GPUs"
            SLOTS=${BASH_REMATCH[2]} SLOTS_FROM=SLURM_GPUS_PER_NODE
        elif [ -n "${SLURM_JOB_GPUS:-}" ]; then
            # GPU indices: 0,1,2,3 (or ranges: 0-3)
            SLOTS=0
            for ids in ${SLURM_JOB_GPUS//,/ }; do
                [[ "$ids" =~ ^([0-9]+)(-([0-9]+))?$ ]] ||
                    die "SLURM_JOB_GPUS=$SLURM_JOB_GPUS: expected GPU indices such as 0,1,2,3"
                SLOTS=$((SLOTS + ${BASH_REMATCH[3]:-${BASH_REMATCH[1]}} - BASH_REMATCH[1] + 1))
            done
            SLOTS_FROM=SLURM_JOB_GPUS
        elif [ "$NGPU" -gt 0 ]; then
            SLOTS=$NGPU SLOTS_FROM=nvidia-smi
        else
            SLOTS=${NPROC:-2} SLOTS_FROM="CPU ranks"
        fi
        # Written whole under a temporary name, then renamed: a node never reads half a file.
        HOSTFILE="${TMPDIR:-/tmp}/llama-ft-slurm-$SLURM_JOB_ID.hostfile"
        HOSTFILE_TMP=$(mktemp "$HOSTFILE.XXXXXX" 2>/dev/null) ||
            die "$SLURM_JOB: cannot write its hostfile in ${TMPDIR:-/tmp} (TMPDIR)"
        if ! printf '%s\n' "# $SLURM_JOB: SLURM_JOB_NODELIST=$SLURM_JOB_NODELIST, slots from $SLOTS_FROM" \
                "${SLURM_HOSTS[@]/%/ slots=$SLOTS}" >"$HOSTFILE_TMP" || ! mv -f "$HOSTFILE_TMP" "$HOSTFILE"; then
            rm -f "$HOSTFILE_TMP"
            die "$SLURM_JOB: cannot write its hostfile $HOSTFILE"
        fi
        HOSTFILE_FROM="SLURM_JOB_NODELIST, $SLOTS slot(s) per node from $SLOTS_FROM"
        HOSTS_FROM="SLURM_JOB_NODELIST=$SLURM_JOB_NODELIST"
    else
        HOSTFILE_FROM="HOSTFILE" HOSTS_FROM="HOSTFILE $HOSTFILE"
    fi
fi
HOSTFILE="${HOSTFILE:-$HERE/hostfiles/localhost}"

[ -f "$HOSTFILE" ] || die "HOSTFILE $HOSTFILE: file not found"
[ -f "$DS_CONFIG" ] || die "DS_CONFIG $DS_CONFIG: file not found"
command -v "$DEEPSPEED" >/dev/null || die "'$DEEPSPEED' launcher not on PATH (pip install deepspeed, or set DEEPSPEED)"

# Syntax, duplicates and slots first: one line naming the hostfile line, not a launcher traceback.
"$PYTHON" -m llama_ft.cli hostfile check "$HOSTFILE" >/dev/null
# Hosts named in the hostfile (comments and blank lines skipped).
mapfile -t HOSTS < <(sed -e 's/#.*//' "$HOSTFILE" | awk 'NF {print $1}')
# names of this machine (a failing `hostname` must not end the script under set -e: it only names fewer)
LOCAL_HOST_RE="^(localhost|127\.0\.0\.1|$(hostname 2>/dev/null || true)|$(hostname -s 2>/dev/null || true))$"
# Every rank on this machine (no NODE_RANK and no Slurm job, so no other node runs a launcher of its own; every
# host a name of this one): rank 0's port is known to be free or busy here, and no other node must agree on it.
ONE_NODE=0
if [ -z "${NODE_RANK:-}" ] && [ -z "$SLURM_JOB" ]; then
    ONE_NODE=1
    for host in "${HOSTS[@]}"; do [[ "$host" =~ $LOCAL_HOST_RE ]] || ONE_NODE=0; done
fi
if [ -n "${MASTER_PORT:-}" ]; then
    [[ "$MASTER_PORT" =~ ^[1-9][0-9]{0,4}$ ]] && [ "$MASTER_PORT" -le 65535 ] ||
        die "MASTER_PORT=$MASTER_PORT: expected a port number 1..65535"
    if [ "$ONE_NODE" -eq 1 ]; then
        # refused here, not by rank 0's DistNetworkError after every rank has started
        PORT_STATUS=0
        "$PYTHON" -m llama_ft.rendezvous check-port "$MASTER_PORT" || PORT_STATUS=$?
        [ "$PORT_STATUS" -ne 3 ] || die "MASTER_PORT=$MASTER_PORT: the port is in use on this machine (another" \
            "job?); unset MASTER_PORT to pick a free one, or choose another"
    fi
elif [ "$ONE_NODE" -eq 0 ]; then
    MASTER_PORT=29500  # several nodes must agree on it without talking: DeepSpeed's (torch's) default
fi

if [ -n "$SLURM_JOB" ]; then
    # The hostfile must be the job's nodes (a derived one is, by construction), and srun must have started
    # one task per node: otherwise ranks would wait for nodes where nothing runs.
    for host in "${HOSTS[@]}"; do
        [[ " ${SLURM_HOSTS[*]} " == *" $host "* ]] || die "HOSTFILE $HOSTFILE: host '$host' is not a node of" \
            "$SLURM_JOB (SLURM_JOB_NODELIST=$SLURM_JOB_NODELIST: ${SLURM_HOSTS[*]});" \
            "unset HOSTFILE to use the job's nodes"
    done
    for var in SLURM_JOB_NUM_NODES SLURM_NNODES SLURM_STEP_NUM_NODES SLURM_STEP_NUM_TASKS; do
        if [ -z "${!var:-}" ] || [ "${!var}" = "${#HOSTS[@]}" ]; then continue; fi
        case "$var:$HOSTFILE_FROM" in
            SLURM_JOB_NUM_NODES:HOSTFILE) HINT="list every node of the job in HOSTFILE, or unset it" ;;
            SLURM_JOB_NUM_NODES:*) HINT="scontrol and the job's variables disagree" ;;
            *) HINT="start run-llama.sh with srun, one task per node of the job (hostfiles/slurm.sbatch)" ;;
        esac
        die "$var=${!var}: expected ${#HOSTS[@]}, one per host of $HOSTS_FROM (${HOSTS[*]}); $HINT"
    done
    [ "${#HOSTS[@]}" -eq "${#SLURM_HOSTS[@]}" ] || die "HOSTFILE $HOSTFILE: ${#HOSTS[@]} host(s) (${HOSTS[*]})," \
        "but $SLURM_JOB has ${#SLURM_HOSTS[@]} nodes (${SLURM_HOSTS[*]}); list them all, or unset HOSTFILE"
    if [ -z "${NODE_RANK:-}" ]; then
        [ -z "${INCLUDE:-}${EXCLUDE:-}" ] || die "INCLUDE/EXCLUDE in $SLURM_JOB: NODE_RANK cannot come from" \
            "SLURM_NODEID when the filters renumber the hosts; set NODE_RANK, or choose GPUs with the job's options"
        [ -n "${SLURM_NODEID:-}" ] || die "$SLURM_JOB: SLURM_NODEID is not set: start run-llama.sh with srun" \
            "(one task per node, as in hostfiles/slurm.sbatch), or set NODE_RANK"
        if ! [[ "$SLURM_NODEID" =~ ^[0-9]+$ ]] || [ "$SLURM_NODEID" -ge "${#SLURM_HOSTS[@]}" ]; then
            die "SLURM_NODEID=$SLURM_NODEID: expected 0..$((${#SLURM_HOSTS[@]} - 1)), one per node of $SLURM_JOB" \
                "(${SLURM_HOSTS[*]})"
        fi
        # this node's line in the hostfile (an explicit one may list the job's nodes in another order)
        for i in "${!HOSTS[@]}"; do
            if [ "${HOSTS[$i]}" = "${SLURM_HOSTS[$SLURM_NODEID]}" ]; then NODE_RANK=$i; fi
        done
        NODE_RANK_FROM="SLURM_NODEID=$SLURM_NODEID"
    fi
    if [ -z "${MASTER_ADDR:-}" ]; then MASTER_ADDR=${HOSTS[0]} MASTER_ADDR_FROM="the first host"; fi
    echo "run-llama.sh: $SLURM_JOB: hosts ${HOSTS[*]} (hostfile $HOSTFILE from $HOSTFILE_FROM)," \
        "NODE_RANK=$NODE_RANK (${NODE_RANK_FROM:-set}), MASTER_ADDR=$MASTER_ADDR (${MASTER_ADDR_FROM:-set})," \
        "MASTER_PORT=$MASTER_PORT (${MASTER_PORT_FROM:-set})" >&2
fi

if [ -z "${MODEL:-}" ]; then
    MODEL="$CACHE_DIR/tiny-llama"
    "$PYTHON" -m llama_ft.cli make-tiny "$MODEL" >/dev/null
    # The embedded default: settings under which the tiny model visibly learns in a few minutes on CPU.
    DEFAULTS=(--max_steps 60 --lora_r 16 --lora_alpha 32 --lora_dropout 0.05 --learning_rate 5e-3
              --lr_scheduler_type cosine --warmup_ratio 0.05 --per_device_train_batch_size 4
              --gradient_accumulation_steps 1 --source_max_len 256 --target_max_len 64 --save_steps 30
              --eval_dataset_size 16 --max_grad_norm 1.0 --overwrite_output_dir)
else
    # Snowflake's Llama 3.1 recipe settings.
    DEFAULTS=(--max_steps 1000 --lora_r 64 --lora_alpha 16 --lora_dropout 0.05 --learning_rate 1e-4
              --lr_scheduler_type linear --warmup_ratio 0.03 --per_device_train_batch_size 1
              --gradient_accumulation_steps 4 --source_max_len 1024 --target_max_len 256 --save_steps 250
              --gradient_checkpointing --max_grad_norm 0.3)
fi
if [ -n "${MERGE_DIR:-}" ] && grep -qs '"quantization_config"' "$MODEL/config.json"; then
    die "MERGE_DIR: $MODEL is a pre-quantized (FP8 or bnb-4bit) checkpoint; merge into its bf16 original (apply_ds_adapters.py --base BF16_DIR)"
fi
DATA_ARGS=()
[ -n "${DATA:-}" ] && DATA_ARGS=(--dataset "$DATA")

[ -z "${NPROC:-}" ] || [[ "$NPROC" =~ ^[1-9][0-9]*$ ]] || die "NPROC=$NPROC: expected an integer > 0 (ranks per node)"
LAUNCH=(--hostfile "$HOSTFILE")
CHECK=()
[ -n "${INCLUDE:-}" ] && LAUNCH+=(--include "$INCLUDE") && CHECK+=(--include "$INCLUDE")
[ -n "${EXCLUDE:-}" ] && LAUNCH+=(--exclude "$EXCLUDE") && CHECK+=(--exclude "$EXCLUDE")
if [ -n "${NODE_RANK:-}" ]; then
    # No-ssh multi-node: every node runs this script itself; the launcher starts only this node's ranks.
    [ -n "${MASTER_ADDR:-}" ] || die "NODE_RANK=$NODE_RANK needs MASTER_ADDR (the address of the node with NODE_RANK=0)"
    [[ "$NODE_RANK" =~ ^[0-9]+$ ]] || die "NODE_RANK=$NODE_RANK: expected a node index 0, 1, ..."
    LAUNCH+=(--no_ssh --node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR")
    [ -n "${NPROC:-}" ] && [ ${#CHECK[@]} -eq 0 ] && LAUNCH+=(--num_gpus "$NPROC") && CHECK+=(--num_gpus "$NPROC")
    # NODE_RANK indexes the hosts left after INCLUDE/EXCLUDE, as the launcher counts them
    LOCAL_RANKS=$("$PYTHON" -m llama_ft.cli hostfile check "$HOSTFILE" ${CHECK[@]+"${CHECK[@]}"} --node_rank "$NODE_RANK")
    if [ "$NGPU" -eq 0 ] && [ -z "${OMP_NUM_THREADS:-}" ]; then
        export OMP_NUM_THREADS=$(( $(nproc) / LOCAL_RANKS > 0 ? $(nproc) / LOCAL_RANKS : 1 ))
    fi
elif [ "${#HOSTS[@]}" -eq 1 ] && [[ "${HOSTS[0]}" =~ $LOCAL_HOST_RE ]]; then
    # One local host: no ssh needed; use every GPU, or 2 CPU ranks when there is none.
    if [ "$NGPU" -gt 0 ]; then NPROC="${NPROC:-$NGPU}"; else NPROC="${NPROC:-2}"; fi
    # the launcher refuses --num_gpus together with --include/--exclude
    [ ${#CHECK[@]} -eq 0 ] && LAUNCH+=(--num_gpus "$NPROC") && CHECK+=(--num_gpus "$NPROC")
    LAUNCH+=(--no_ssh_check --master_addr "${MASTER_ADDR:-127.0.0.1}")
    if [ "$NGPU" -eq 0 ] && [ -z "${OMP_NUM_THREADS:-}" ]; then
        # The DeepSpeed launcher leaves OMP threads unset: every rank would use every core.
        export OMP_NUM_THREADS=$(( $(nproc) / NPROC > 0 ? $(nproc) / NPROC : 1 ))
    fi
else
    [ -n "${MASTER_ADDR:-}" ] && LAUNCH+=(--master_addr "$MASTER_ADDR")
    [ -n "${NPROC:-}" ] && [ ${#CHECK[@]} -eq 0 ] && LAUNCH+=(--num_gpus "$NPROC") && CHECK+=(--num_gpus "$NPROC")
fi
# The rank request must fit the slots (e.g. NPROC above a host's slots, an --include of an unknown host).
"$PYTHON" -m llama_ft.cli hostfile check "$HOSTFILE" ${CHECK[@]+"${CHECK[@]}"} >/dev/null

# The memory plan (llama-ft plan) of this launch: every rank's GPU memory, or on CPU ranks the host's.
FORCE=0
TRAIN_ARGS=()
for arg in "$@"; do
    if [ "$arg" = "--force" ]; then FORCE=1; else TRAIN_ARGS+=("$arg"); fi
done
set -- ${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"}
PLAN=(--hostfile "$HOSTFILE" --brief)
[ -n "${INCLUDE:-}" ] && PLAN+=(--include "$INCLUDE")
[ -n "${EXCLUDE:-}" ] && PLAN+=(--exclude "$EXCLUDE")
[[ " ${CHECK[*]-} " == *" --num_gpus "* ]] && PLAN+=(--gpus_per_node "$NPROC")
HOST_GB="${LLAMA_FT_HOST_MEMORY_GB:-$(awk '/^MemTotal:/ {printf "%.2f", $2 / 1048576}' /proc/meminfo 2>/dev/null)}"
[ -n "$HOST_GB" ] && PLAN+=(--host_memory_gb "$HOST_GB")
if [ -n "${LLAMA_FT_GPU_MEMORY_GB:-}" ]; then
    PLAN+=(--gpu_memory_gb "$LLAMA_FT_GPU_MEMORY_GB")
elif [ "$NGPU" -gt 0 ]; then
    PLAN+=(--gpu_memory_gb "$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | sort -n | head -1 |
                              awk '{printf "%.2f", $1 / 1024}')")
else
    PLAN+=(--device cpu)
fi
# The report goes to stderr; the plan's own error lines are captured (fd 3: this script's stderr).
PLAN_STATUS=0
exec 3>&2
PLAN_ERR=$("$PYTHON" -m llama_ft.cli plan "${PLAN[@]}" -- --model_name_or_path "$MODEL" --deepspeed "$DS_CONFIG" \
    --bf16 "${DEFAULTS[@]}" ${CONFIG_ARGS[@]+"${CONFIG_ARGS[@]}"} "$@" 2>&1 1>&3) || PLAN_STATUS=$?
exec 3>&-
if [ "$PLAN_STATUS" -eq 1 ] && [[ "$PLAN_ERR" == "llama-ft plan: "* ]]; then  # the verdict, not a crash
    echo "$PLAN_ERR" >&2
    if [ "$FORCE" -ne 1 ]; then
        echo "run-llama.sh: error: stopped before launching: the run does not fit (the memory plan above);" \
             "pass --force to launch anyway" >&2
        exit 1
    fi
    echo "run-llama.sh: --force: launching although the memory plan says the run does not fit" >&2
elif [ "$PLAN_STATUS" -eq 3 ] && [[ "$PLAN_ERR" == *"llama-ft plan: error: "* ]]; then
    # A long-context layout training refuses too (a --sequence_parallel_size the model's heads or the ranks cannot
    # take, ...): stop here with the plan's line, rather than start every rank only for each to stop on it.
    # --force does not apply: it overrides the memory verdict, and training would refuse these flags anyway.
    die "$(echo "${PLAN_ERR##*llama-ft plan: error: }" | tail -1)"
elif [ "$PLAN_STATUS" -ne 0 ]; then
    # Not a verdict: flags or files the plan cannot read (training checks them itself and names the problem),
    # or the planner failed: say so in one line and launch.
    echo "run-llama.sh: note: no memory plan before launching ($(echo "${PLAN_ERR##*llama-ft plan: error: }" |
        tail -1))" >&2
elif [ -n "$PLAN_ERR" ]; then
    echo "$PLAN_ERR" >&2
fi

if [ -z "${MASTER_PORT:-}" ]; then
    # One node and no port asked for: a free one, as `torchrun --standalone` picks it (the kernel's choice for
    # port 0), so that two jobs on one machine do not both take 29500. Picked last, to keep the time before
    # rank 0 binds it short; a job that takes it in between is caught by rank 0 (llama_ft/rendezvous.py).
    MASTER_PORT=$("$PYTHON" -m llama_ft.rendezvous free-port) ||
        die "MASTER_PORT: no free port could be picked on this machine (see above); set MASTER_PORT"
    echo "run-llama.sh: MASTER_PORT $MASTER_PORT (a free port; set MASTER_PORT to choose)" >&2
fi
LAUNCH+=(--master_port "$MASTER_PORT")
echo "run-llama.sh: model $MODEL, hosts ${HOSTS[*]}, output $OUTPUT_DIR" >&2
# The launcher runs in a session of its own, so a terminal's Ctrl-C reaches only this script, which passes
# it on to the ranks (below) instead of also setting off DeepSpeed's 30-second kill.
SETSID=()
command -v setsid >/dev/null && SETSID=(setsid)
# Every rank on this host watches this script's pid (llama_ft/train/faults.py LauncherWatch): a kill -9 of the
# script runs no trap, and the launcher's own session would otherwise keep the ranks training on, orphaned.
export LLAMA_FT_LAUNCHER_PID=$$ LLAMA_FT_LAUNCHER_HOST
LLAMA_FT_LAUNCHER_HOST=$(hostname 2>/dev/null || true)
# Rank 0 writes OUTPUT_DIR/train_results.json last of all: written after this time, this run finished (below).
STARTED_AT=$(date +%s)
${SETSID[@]+"${SETSID[@]}"} "$DEEPSPEED" "${LAUNCH[@]}" --module llama_ft.train \
    --model_name_or_path "$MODEL" --output_dir "$OUTPUT_DIR" --deepspeed "$DS_CONFIG" --bf16 \
    ${DATA_ARGS[@]+"${DATA_ARGS[@]}"} "${DEFAULTS[@]}" ${CONFIG_ARGS[@]+"${CONFIG_ARGS[@]}"} "$@" &
RUNNER=$!
# SIGTERM/SIGINT to this script (a scheduler's preemption, Ctrl-C) go to the ranks themselves: they finish
# the step, save a checkpoint and exit 128+signal; a second one aborts. Left to DeepSpeed, a signal sent to
# its local launcher alone is not passed on, and its per-node process SIGKILLs a rank 30 s after forwarding
# one. With ssh (pdsh) the ranks are remote: the launcher's own handler signals them on every host.
forward() {
    if [ -z "${NODE_RANK:-}" ] && [ "${#HOSTS[@]}" -gt 1 ]; then
        kill -"$1" "$RUNNER" 2>/dev/null || true
        return
    fi
    local node
    for node in $(pgrep -P "$RUNNER"); do pkill -"$1" -P "$node" 2>/dev/null || true; done
}
trap 'forward TERM' TERM HUP
trap 'forward INT' INT
while true; do
    STATUS=0
    wait "$RUNNER" || STATUS=$?
    kill -0 "$RUNNER" 2>/dev/null || break  # done, not just woken by a signal
done
trap - TERM HUP INT
RESULTS="$OUTPUT_DIR/train_results.json" HELP=0
for ((i = 1; i <= $#; i++)); do  # the training flags' --output_dir, if any, wins over OUTPUT_DIR (last one)
    case "${!i}" in
        --output_dir) j=$((i + 1)); [ "$j" -gt $# ] || RESULTS="${!j}/train_results.json" ;;
        --output_dir=*) RESULTS="${!i#--output_dir=}/train_results.json" ;;
        -h | --help) HELP=1 ;;  # the ranks printed the flags: nothing was to be trained
    esac
done
if [ "$STATUS" -eq 0 ] && [ "$ONE_NODE" -eq 1 ] && [ "$HELP" -eq 0 ] &&
   [ "$(stat -c %Y "$RESULTS" 2>/dev/null || echo 0)" -lt "$STARTED_AT" ]; then
    # DeepSpeed's runner exits 0 when its per-node process is killed by a signal (it only passes on a positive
    # status): without this, a job whose launcher was killed mid-run would count as done (found by tests/soak.py).
    # (One node only: there every rank has ended, rank 0 included, when the launcher returns.)
    die "the launcher exited 0, but training did not finish ($RESULTS was not written by this run): a launcher" \
        "process was killed? The last complete checkpoint is kept; resume with --resume_from_checkpoint latest"
fi
[ "$STATUS" -eq 0 ] || exit "$STATUS"

if [ -n "${MERGE_DIR:-}" ]; then
    # Replace MERGE_DIR only if it holds an earlier merge output; anything else is refused by the merge.
    OVERWRITE=()
    [ -f "$MERGE_DIR/model.safetensors.index.json" ] && [ -f "$MERGE_DIR/config.json" ] && OVERWRITE=(--overwrite)
    "$PYTHON" "$HERE/apply_ds_adapters.py" --base "$MODEL" --adapter "$OUTPUT_DIR" --output "$MERGE_DIR" \
        ${OVERWRITE[@]+"${OVERWRITE[@]}"}
fi
