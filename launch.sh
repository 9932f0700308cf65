#!/usr/bin/env bash
# Start minimoe distillation (or finetuning) through the deepspeed launcher, on this node or on a cluster.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: ./launch.sh [--slurm] distill [launch options] [minimoe-distill flags]
       ./launch.sh [--slurm] finetune [launch options] [suite] [minimoe-finetune flags]

Runs `deepspeed ... --module pipeline.COMMAND FLAGS` and prints that command first.
minimoe-distill flags: see `python -m pipeline.distill --help` (e.g. --teacher --shards --output).
minimoe-finetune flags: see `python -m pipeline.finetune [suite] --help`; each process trains on
--batch-size examples per step (data parallel), so the global batch is --batch-size x processes.

launch options (taken by this script, anywhere on the line):
  --num-procs N      processes on this node (default: one per GPU, or one per CPU core without GPUs;
                     cores are counted whatever OMP_NUM_THREADS says); at most one per GPU
  --hostfile FILE    multi-node: a DeepSpeed hostfile, one "HOST slots=N" line per node (ssh/pdsh)
  --num-nodes N  --include S  --exclude S  --master-addr A  --master-port P  --launcher L
                     passed to the deepspeed launcher (multi-node; --master-port also single-node,
                     where a free port is picked when it is not given)
  --no-ssh           multi-node without ssh: run this script on every node, each with the same --hostfile,
                     --master-addr (node 0's address) and --master-port, and its own --node-rank
  --node-rank I      this node's rank with --no-ssh: its line in the hostfile, from 0
  --slurm            under srun, one task per node: writes the hostfile from SLURM_JOB_NODELIST
                     (`scontrol show hostnames`, slots = --num-procs or this node's devices), then runs as
                     --no-ssh --node-rank $SLURM_NODEID --master-addr FIRST_HOST
                     --master-port $((20000 + SLURM_JOB_ID % 10000)) (either can be given instead)
  --bind-cores       pin each CPU rank to its own cores (needs numactl; ~25% faster on CPUs)
  --verbose          the launcher's INFO lines (its per-rank bookkeeping; default: warnings and errors only)
  --dry-run          print the command, do not run it

environment: DS_ACCELERATOR=cpu runs CPU ranks (gloo) also on a node with GPUs.
PYTHON=/path/to/python runs that interpreter's launcher (python -m deepspeed.launcher.runner).
Without it, the project's .venv (made by `make install`) is used when it exists, else `deepspeed` on PATH.

examples:
  # MiniMoE 3L;384H from the packaged teacher on all local devices, ZeRO-2 fp32
  ./launch.sh distill --teacher TEACHER_DIR --shards runs/shards --output runs/minimoe-3l
  # two processes, experts spread over both (expert parallelism), bf16
  ./launch.sh distill --num-procs 2 --ep-size 2 --deepspeed-config ds_configs/zero2-bf16.json \
      --teacher TEACHER_DIR --shards runs/shards --output runs/minimoe-ep2
  # a cluster: 2 nodes x 8 GPUs listed in a hostfile, started over ssh (pdsh) from node0
  ./launch.sh distill --hostfile hosts.txt --master-addr node0 --teacher ... --shards ... --output ...
  # the same without ssh: this line on every node, with --node-rank 0 on node0 and 1 on the other
  ./launch.sh distill --hostfile hosts.txt --no-ssh --node-rank 0 --master-addr node0 --master-port 29500 ...
  # Slurm: one launcher per node, each starting that node's ranks
  srun --nodes 2 --ntasks-per-node 1 ./launch.sh --slurm distill --teacher ... --shards ... --output ...

  # teacher assistant (the paper's "w/ TA"): teacher -> dense 12L;384H TA (runs/w-ta/assistant) -> student,
  # one recipe; add --resume to go on with whichever stage was interrupted
  ./launch.sh distill --teacher BERT_DIR --assistant 12L384H --student 3L384H --experts 1 --shards S --output runs/w-ta

  # finetune the exported student on RTE with 2 data-parallel processes
  ./launch.sh finetune --num-procs 2 --model runs/student-model --task rte --data-dir DATA --output runs/rte
EOF
}

# This node's cores, whatever OMP_NUM_THREADS says (nproc obeys it: OMP_NUM_THREADS=1 would mean one process).
cores() { env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc; }

fail() { echo "error: $*" >&2; exit 2; }

slurm=0
if [[ "${1:-}" == "--slurm" ]]; then slurm=1; shift; fi
if [[ $# -eq 0 || "$1" == "-h" || "$1" == "--help" ]]; then usage; exit 0; fi
command=$1; shift
if [[ "$command" != "distill" && "$command" != "finetune" ]]; then
  echo "error: unknown command '$command' (known: distill, finetune); see ./launch.sh --help" >&2
  exit 2
fi

repo="$(cd "$(dirname "$0")" && pwd)"
# The launcher: $PYTHON's, else the project venv's (with its tools on PATH and its JIT-built DeepSpeed ops,
# as under make), else `deepspeed` on PATH.
if [[ -z "${PYTHON:-}" && -x "$repo/.venv/bin/python" ]]; then
  PYTHON="$repo/.venv/bin/python"
  export PATH="$repo/.venv/bin:$PATH" TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$repo/.venv/torch_extensions}"
fi
if [[ -n "${PYTHON:-}" ]]; then
  launcher=("$PYTHON" -m deepspeed.launcher.runner)
elif command -v deepspeed >/dev/null 2>&1; then
  launcher=(deepspeed)
else
  echo "error: no .venv in $repo and no deepspeed on PATH: run 'make install' (or set PYTHON=/path/to/python)" >&2
  exit 2
fi
procs=""
hostfile=""
port_given=0
addr_given=0
node_rank=""
no_ssh=0
multi_node=0
dry_run=0
log_level=warning
flags=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --num-procs|--hostfile|--num-nodes|--include|--exclude|--master-addr|--master-port|--launcher|--node-rank)
      if [[ $# -lt 2 || "$2" == --* ]]; then
        echo "error: $1 needs a value; see ./launch.sh --help" >&2
        exit 2
      fi ;;&
    --num-procs) procs=$2; shift 2 ;;
    --hostfile) hostfile=$2; multi_node=1; launcher+=(--hostfile "$2"); shift 2 ;;
    --num-nodes|--include|--exclude|--master-addr|--master-port|--launcher|--node-rank)
      [[ "$1" == --master-port ]] && port_given=1
      [[ "$1" == --master-addr ]] && addr_given=1
      [[ "$1" == --node-rank ]] && node_rank=$2
      [[ "$1" == --num-nodes || "$1" == --node-rank ]] && multi_node=1
      launcher+=("--$(echo "${1#--}" | tr - _)" "$2"); shift 2 ;;
    --no-ssh) no_ssh=1; multi_node=1; launcher+=(--no_ssh); shift ;;
    --slurm) slurm=1; shift ;;
    --bind-cores) launcher+=(--bind_cores_to_rank); shift ;;
    --dry-run) dry_run=1; shift ;;
    --verbose) log_level=info; shift ;;
    *) flags+=("$1"); shift ;;
  esac
done

if [[ -n "$procs" && ! "$procs" =~ ^[1-9][0-9]*$ ]]; then
  fail "--num-procs must be a positive integer, got '$procs'"
fi
if [[ -n "$hostfile" && ! -f "$hostfile" ]]; then
  fail "--hostfile $hostfile: no such file"
fi
gpus=0  # DS_ACCELERATOR=cpu: CPU ranks, also on a node with GPUs
if [[ "${DS_ACCELERATOR:-}" != cpu ]] && command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  gpus=$(nvidia-smi -L | wc -l)
fi
if [[ -z "$procs" && ( -z "$hostfile" || $slurm -eq 1 ) ]]; then
  procs=$(( gpus > 0 ? gpus : $(cores) ))
fi
# DeepSpeed's launcher would hand out devices that do not exist, and the extra ranks die in CUDA's set_device.
if [[ $gpus -gt 0 && -n "$procs" && $procs -gt $gpus ]]; then
  fail "--num-procs $procs: this node has $gpus GPU(s), one process each; DS_ACCELERATOR=cpu runs CPU ranks instead"
fi

# Slurm: srun starts this script once per node; each writes the job's hostfile (every node with this node's
# slots) and becomes that node's --no-ssh launcher. Node 0 of the job is the master.
if [[ $slurm -eq 1 ]]; then
  if [[ -n "$hostfile" || $no_ssh -eq 1 || -n "$node_rank" ]]; then
    fail "--slurm writes the hostfile and sets --no-ssh and --node-rank itself: drop --hostfile/--no-ssh/--node-rank"
  fi
  for var in SLURM_JOB_NODELIST SLURM_NODEID SLURM_JOB_ID; do
    [[ -n "${!var:-}" ]] || fail "--slurm: $var is not set; run it under srun, one task per node (see ./launch.sh --help)"
  done
  command -v scontrol >/dev/null 2>&1 || fail "--slurm: scontrol not found on PATH (it expands SLURM_JOB_NODELIST=$SLURM_JOB_NODELIST)"
  hosts=$(scontrol show hostnames "$SLURM_JOB_NODELIST") || fail "--slurm: scontrol show hostnames '$SLURM_JOB_NODELIST' failed"
  [[ -n "$hosts" ]] || fail "--slurm: scontrol show hostnames '$SLURM_JOB_NODELIST' printed no host"
  hostfile=$(mktemp "${TMPDIR:-/tmp}/minimoe-hostfile.XXXXXX")
  printf '%s slots='"$procs"'\n' $hosts > "$hostfile"
  launcher+=(--hostfile "$hostfile" --no_ssh --node_rank "$SLURM_NODEID")
  [[ $addr_given -eq 1 ]] || launcher+=(--master_addr "${hosts%%$'\n'*}")
  # Every node derives the same port from the job id; two jobs sharing a node do not collide.
  [[ $port_given -eq 1 ]] || launcher+=(--master_port "$(( 20000 + SLURM_JOB_ID % 10000 ))")
  no_ssh=1 node_rank=$SLURM_NODEID addr_given=1 port_given=1 multi_node=1
fi
# Without ssh nothing asks the nodes for their addresses: each must be told where node 0 is and which it is.
if [[ $no_ssh -eq 1 ]]; then
  [[ -n "$hostfile" ]] || fail "--no-ssh needs --hostfile (the same file on every node, one \"HOST slots=N\" line each)"
  [[ -n "$node_rank" ]] || fail "--no-ssh needs --node-rank I (this node's line in $hostfile, from 0)"
  [[ $addr_given -eq 1 ]] || fail "--no-ssh needs --master-addr (node 0's address, the same on every node)"
fi
# Without GPUs DeepSpeed falls back to its CPU accelerator anyway, warning so in every process; say it.
if [[ $gpus -eq 0 ]]; then
  export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
fi
if [[ -n "$procs" ]]; then
  launcher+=(--num_gpus "$procs")
fi

# Like torchrun: without an explicit OMP_NUM_THREADS, split this node's cores between its processes.
# N ranks x torch's default thread count oversubscribe a CPU node, and the ranks then stall each other.
if [[ -z "${OMP_NUM_THREADS:-}" && -n "$procs" ]]; then
  export OMP_NUM_THREADS=$(( $(cores) / procs > 0 ? $(cores) / procs : 1 ))
fi
# Two runs on one node would both take the launcher's default port 29500: pick a free one (single node only:
# the nodes of a multi-node run must agree on it, so there it is the user's, or the launcher's default).
if [[ $port_given -eq 0 && $multi_node -eq 0 ]]; then
  launcher+=(--master_port "$("${PYTHON:-python3}" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')")
fi

# pipeline/ importable from any working directory (relative paths in FLAGS stay the user's).
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
cmd=("${launcher[@]}" --log_level "$log_level" --module "pipeline.$command" "${flags[@]}")
printf '+' >&2; printf ' %q' "${cmd[@]}" >&2; printf '\n' >&2
if [[ $dry_run -eq 1 ]]; then exit 0; fi
exec "${cmd[@]}"
