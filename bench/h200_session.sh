#!/usr/bin/env bash
# The GPU measurements behind RESULTS.md, packed for a lease of 4 H200s (one job per GPU, in parallel).
#   bash bench/h200_session.sh 1    kernels' CUDA checks + FP8 / MoE / mHC / attention-memory benches,
#                                   and the small preset trained as V4 and as its baseline twin
#   bash bench/h200_session.sh 2    CUDA checks, mHC / CSA benches, step profiles, the small preset as V4
#                                   and as its baseline twin on the 3.11 standard library, with samples
#   bash bench/h200_session.sh 3    FSDP2 scaling on 1, 2, 4 GPUs; Muon vs AdamW
#   bash bench/h200_session.sh 4    what the first lease left open: the whole small preset at long T, step
#                                   profile and CUDA checks, CSA kernel tests + bench, a longer V4 run + sample
#   bash bench/h200_session.sh 5    FSDP2 scaling again, each size alone (after the Muon partitioning)
#   bash bench/h200_session.sh 6    long T, a 380-step V4 run + sample, CSA + FP8 benches, decode profile
#   bash bench/h200_session.sh 7    FSDP2 on 1 and 2 GPUs (20 steps), then 180 steps on 4 GPUs + sample
#   bash bench/h200_session.sh 8    long T with activation checkpointing, CSA bench, CUDA kernel tests
#   bash bench/h200_session.sh 9    long T after the checkpointed query chunks; CUDA checks; step time
#   bash bench/h200_session.sh 10   the fused Sinkhorn and FP8 routed experts (tests, benches, step, decode)
#   bash bench/h200_session.sh 11   phase 10 + the third session's kernel variants (since reverted, RESULTS.md)
#   bash bench/h200_session.sh 12   FSDP2 scaling 1 / 2 / 4 GPUs, with and without resharding after forward
#   bash bench/h200_session.sh 13   phase 11's checks after the reverts; FSDP2 scaling with --grad-accum 2
#   bash bench/h200_session.sh 14   FSDP2 scaling with NCCL_PROTO=Simple, 1 / 2 / 4 GPUs in one lease
#   bash bench/h200_session.sh 15   FSDP2 scaling, 45-step runs on 1 / 2 / 4 GPUs
#   bash bench/h200_session.sh 16   one H200: FP8 GEMM pairs ablation + 8192^3 sweep, CSA bench
#   bash bench/h200_session.sh 17   one H200: CUDA checks (FP8 indexer), CSA bench, step with / without --fp8
#   bash bench/h200_session.sh 18   (removed: the fourth session's experiments, measured in the fifth)
#   bash bench/h200_session.sh 19   one H200: FP8 GEMM bench (kernels in turn), CSA bench, CSA CUDA tests
#   bash bench/h200_session.sh 20   one H200: FP8 GEMM bench with the Gluon kernel, CSA CUDA tests + bench
#   bash bench/h200_session.sh 21   one H200: the Gluon sparse attention's schedules, CSA CUDA tests + bench
# Phases 2-9 and 12-15 train on the CPU machines' corpus: first `python bench/pack_corpus.py` here
# (writes .data/stdlib311.tgz), then call the device with carry=[".data"].
# Logs go to $OUT (or ./out/session) as gpuN.log; each job has its own time limit.
set -u
OUT=${OUT:-out/session}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
PY=python3
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } > "$OUT/env.log" 2>&1
# the tokenizer and token shards, once, before the parallel jobs read them
$PY -c "from data import prepare_data; prepare_data(None, vocab_size=8192, cache_dir='cache')" >> "$OUT/env.log" 2>&1

SMALL="--preset small --vocab-size 8192 --seq-len 2048 --batch-size 8 --lr 2e-3 --warmup-steps 50 \
       --eval-interval 100 --eval-batches 10 --log-interval 10"
job() {  # job GPU SECONDS COMMAND...: run on one GPU with a time limit, appending to gpuN.log
  local gpu=$1 limit=$2; shift 2
  echo "### $* (limit ${limit}s)" >> "$OUT/gpu$gpu.log"
  CUDA_VISIBLE_DEVICES=$gpu timeout "$limit" "$@" >> "$OUT/gpu$gpu.log" 2>&1
  echo "### exit $?" >> "$OUT/gpu$gpu.log"
}

corpus() {  # the CPU machines' corpus (.data/stdlib311.tgz, see above) unpacked and tokenized, once per call
  mkdir -p /tmp/stdlib311 && tar xzf .data/stdlib311.tgz -C /tmp/stdlib311
  $PY -c "from data import prepare_data; prepare_data('/tmp/stdlib311', vocab_size=8192, cache_dir='cache')" >> "$OUT/env.log" 2>&1
}

long_run() {  # long_run GPU SECONDS T [flags...]: 3 steps of the whole small preset at batch 1 x T;
  # its last metrics row (mem_gb: peak memory) goes to long.log
  local gpu=$1 limit=$2 T=$3; shift 3
  job "$gpu" "$limit" $PY train.py --preset small --vocab-size 8192 --data /tmp/stdlib311 --batch-size 1 \
      --steps 3 --log-interval 1 --eval-interval 1000 --ckpt-interval 1000 --seq-len "$T" "$@" --out-dir out/long$T$gpu
  echo "T=$T $* $(grep -h mem_gb out/long$T$gpu/metrics.jsonl 2>/dev/null | tail -n 1)" >> "$OUT/long.log"
}

fsdp() {  # fsdp N GPUS [TAG FLAGS...]: tokens/s of the small preset, 8 sequences of 2048 per GPU
  local n=$1 gpus=$2 tag=${3:-}; shift 2; [ $# -gt 0 ] && shift
  echo "### FSDP on $n GPU(s): $gpus $*" >> "$OUT/fsdp.log"
  rm -rf out/fsdp$n$tag        # a fresh metrics.jsonl (a warm machine keeps the last call's)
  CUDA_VISIBLE_DEVICES=$gpus timeout 150 torchrun --standalone --nproc_per_node $n --master_port $((29400 + n)) \
      train.py $SMALL --data /tmp/stdlib311 --steps ${STEPS:-20} --log-interval 5 --eval-interval 1000 \
      --ckpt-interval 1000 --stop-at $((${STEPS:-20} - 1)) --out-dir out/fsdp$n$tag "$@" >> "$OUT/fsdp.log" 2>&1
  echo "### exit $?" >> "$OUT/fsdp.log"
  cp out/fsdp$n$tag/metrics.jsonl "$OUT/fsdp$n$tag.jsonl"
}

if [ "$1" = 1 ]; then
  ( job 0 150 $PY -m pytest -q -x tests/test_fp8_gemm.py tests/test_csa_select.py tests/test_moe.py tests/test_mhc.py
    job 0 120 $PY bench/gpu_check.py
    job 0 300 $PY bench/bench_fp8_gemm.py ) &
  ( job 1 90 $PY bench/bench_moe.py
    job 1 120 $PY bench/bench_mhc.py
    job 1 330 $PY bench/bench_attention_memory.py ) &
  ( job 2 470 $PY train.py $SMALL --steps 600 --ckpt-interval 300 --out-dir out/small_v4
    job 2 60 $PY sample.py --ckpt out/small_v4/ckpt.pt --prompt "def parse_args(argv):" --max-new-tokens 200 --temperature 0.7
    cp out/small_v4/metrics.jsonl "$OUT/small_v4.jsonl" ) &
  ( job 3 470 $PY train.py $SMALL --steps 600 --ckpt-interval 300 --out-dir out/small_twin \
        --attention full --ffn dense --residual plain
    cp out/small_twin/metrics.jsonl "$OUT/small_twin.jsonl" ) &
  wait
elif [ "$1" = 2 ]; then
  # the CPU machines' corpus (Python 3.11's standard library, 9.2M tokens) carried as .data/stdlib311.tgz:
  # the GPU image's own standard library is a trimmed 3.12 (2.8M tokens)
  corpus
  DATA="--data /tmp/stdlib311 --eval-interval 50 --ckpt-interval 1000"
  ( job 0 100 $PY -m pytest -q tests/test_fp8_gemm.py tests/test_csa_select.py
    job 0 100 $PY bench/gpu_check.py
    job 0 100 $PY bench/bench_mhc.py
    job 0 200 $PY bench/bench_csa_select.py ) &
  ( job 1 470 $PY train.py $SMALL $DATA --steps 250 --out-dir out/small_v4
    job 1 60 $PY sample.py --ckpt out/small_v4/ckpt.pt --prompt "def parse_args(argv):" --max-new-tokens 200 --temperature 0.7
    cp out/small_v4/metrics.jsonl "$OUT/small_v4.jsonl" ) &
  ( job 2 470 $PY train.py $SMALL $DATA --steps 250 --out-dir out/small_twin --attention full --ffn dense --residual plain
    job 2 60 $PY sample.py --ckpt out/small_twin/ckpt.pt --prompt "def parse_args(argv):" --max-new-tokens 200 --temperature 0.7
    cp out/small_twin/metrics.jsonl "$OUT/small_twin.jsonl" ) &
  ( job 3 120 $PY bench/profile_step.py --preset small
    job 3 90 $PY bench/profile_step.py --preset small --set residual=plain --rows 0
    job 3 90 $PY bench/profile_step.py --preset small --set fp8=True --rows 0
    job 3 90 $PY bench/profile_step.py --preset small --set attention=full ffn=dense residual=plain --rows 0 ) &
  wait
elif [ "$1" = 3 ]; then
  corpus
  ( fsdp 1 0; job 0 260 $PY bench/muon_vs_adamw.py --steps 150 --lrs 1e-3 3e-3 --time-budget 240 ) &
  fsdp 2 1,2 &
  ( job 3 330 $PY train.py $SMALL --data /tmp/stdlib311 --eval-interval 50 --steps 200 --out-dir out/small_v4
    job 3 60 $PY sample.py --ckpt out/small_v4/ckpt.pt --prompt "def parse_args(argv):" --max-new-tokens 200 --temperature 0.7
    cp out/small_v4/metrics.jsonl "$OUT/small_v4.jsonl" ) &
  wait
  fsdp 4 0,1,2,3
elif [ "$1" = 4 ]; then
  corpus
  ( for T in 8192 16384 32768 65536; do long_run 0 150 $T; done      # peak memory of the whole model
    long_run 0 150 131072 --set max_seq_len=131072 --activation-checkpointing
    job 0 120 $PY -m pytest -q tests/test_csa_select.py tests/test_fp8_gemm.py
    job 0 200 $PY bench/bench_csa_select.py ) &
  ( job 1 100 $PY bench/profile_step.py --preset small
    job 1 100 $PY bench/gpu_check.py ) &
  ( job 2 470 $PY train.py $SMALL --data /tmp/stdlib311 --eval-interval 100 --steps 400 --ckpt-interval 400 --out-dir out/small_v4
    job 2 100 $PY sample.py --ckpt out/small_v4/ckpt.pt --prompt "def parse_args(argv):" --max-new-tokens 200 --temperature 0.7
    cp out/small_v4/metrics.jsonl "$OUT/small_v4.jsonl" ) &
  wait
elif [ "$1" = 6 ]; then
  # the second session's first lease: long T (#3), the longer V4 run (#7), the kernels (#9, #10), decode
  corpus
  ( for T in 8192 16384 32768 65536; do long_run 0 100 $T; done      # peak memory of the whole model
    long_run 0 150 131072 --set max_seq_len=131072 --activation-checkpointing ) &
  ( job 1 120 $PY -m pytest -q tests/test_csa_select.py tests/test_fp8_gemm.py
    job 1 200 $PY bench/bench_csa_select.py
    job 1 100 $PY bench/profile_decode.py --preset small --context 4096 --new-tokens 32 --rows 25
    job 1 60 $PY bench/profile_decode.py --preset small --context 4096 --new-tokens 32 --kernels reference --rows 0 ) &
  ( job 2 430 $PY train.py $SMALL --data /tmp/stdlib311 --eval-interval 100 --steps 380 --ckpt-interval 100 --out-dir out/small_v4
    cp out/small_v4/metrics.jsonl "$OUT/small_v4.jsonl"
    job 2 80 $PY sample.py --ckpt out/small_v4/ckpt.pt --prompt "def parse_args(argv):" --max-new-tokens 120 --temperature 0.7 ) &
  ( job 3 200 $PY bench/bench_fp8_gemm.py
    job 3 80 $PY bench/profile_step.py --preset small --rows 0
    job 3 80 $PY bench/profile_step.py --preset small --set fp8=True --rows 0
    job 3 100 $PY bench/gpu_check.py ) &
  wait
elif [ "$1" = 7 ]; then
  # FSDP2 scaling: 1 and 2 GPUs for 20 steps each alone, then 4 GPUs training longer (its tok/s is the
  # 4-GPU figure), then a sample from that run
  corpus
  fsdp 1 0; fsdp 2 0,1
  echo "### FSDP on 4 GPUs, 180 steps" >> "$OUT/fsdp.log"
  CUDA_VISIBLE_DEVICES=0,1,2,3 timeout 320 torchrun --standalone --nproc_per_node 4 --master_port 29404 \
      train.py $SMALL --data /tmp/stdlib311 --steps 180 --eval-interval 60 --ckpt-interval 60 \
      --out-dir out/fsdp4 >> "$OUT/fsdp.log" 2>&1
  echo "### exit $?" >> "$OUT/fsdp.log"
  cp out/fsdp4/metrics.jsonl "$OUT/fsdp4.jsonl"
  job 0 50 $PY sample.py --ckpt out/fsdp4/ckpt.pt --prompt "def parse_args(argv):" --max-new-tokens 120 --temperature 0.7
elif [ "$1" = 8 ]; then
  # long T with activation checkpointing (#3), CSA kernels again (#10), the CUDA test files
  corpus
  long_run 0 150 65536 &
  long_run 1 150 65536 --activation-checkpointing &
  long_run 2 200 131072 --set max_seq_len=131072 --activation-checkpointing &
  ( job 3 100 $PY bench/bench_csa_select.py
    job 3 120 $PY -m pytest -q tests/test_csa_select.py tests/test_fp8_gemm.py ) &
  wait
elif [ "$1" = 9 ]; then
  # long T after the checkpointed query chunks (attention core and indexer scores), with and without
  # activation checkpointing; CUDA checks and the step time at T=2048 (unchanged path) beside it
  corpus
  long_run 0 200 65536 &
  long_run 1 200 65536 --activation-checkpointing &
  long_run 2 260 131072 --set max_seq_len=131072 --activation-checkpointing &
  ( job 3 100 $PY bench/gpu_check.py
    job 3 80 $PY bench/profile_step.py --preset small --rows 0
    job 3 120 $PY bench/profile_step.py --preset small --seq-len 16384 --batch-size 1 --rows 0 ) &
  wait
elif [ "$1" = 10 ]; then
  # what the end of the second session wrote without a GPU: the fused Sinkhorn and the FP8 grouped GEMM
  # for the routed experts; checks first, then their effect on the step and on decode
  ( job 0 200 $PY -m pytest -q tests/test_mhc.py tests/test_fp8_gemm.py tests/test_moe.py tests/test_csa_select.py
    job 0 120 $PY bench/gpu_check.py ) &
  ( job 1 150 $PY bench/bench_mhc.py
    job 1 100 $PY bench/profile_decode.py --preset small --context 4096 --new-tokens 32 --rows 25
    job 1 60 $PY bench/profile_decode.py --preset small --context 4096 --new-tokens 32 --kernels reference --rows 0 ) &
  ( job 2 300 $PY bench/bench_fp8_gemm.py ) &
  ( job 3 80 $PY bench/profile_step.py --preset small --rows 0
    job 3 80 $PY bench/profile_step.py --preset small --set kernels=reference --rows 0
    job 3 80 $PY bench/profile_step.py --preset small --set fp8=True --rows 0 ) &
  wait
elif [ "$1" = 11 ]; then
  # the third session's first lease: phase 10's checks of the second session's unmeasured code, plus the
  # byte-a-pass top-k, the lazily rescaled sparse attention and the paired-K FP8 GEMM candidates
  ( job 0 240 $PY -m pytest -q tests/test_mhc.py tests/test_fp8_gemm.py tests/test_moe.py tests/test_csa_select.py
    job 0 120 $PY bench/gpu_check.py ) &
  ( job 1 220 $PY bench/bench_csa_select.py
    job 1 120 $PY bench/bench_mhc.py
    job 1 100 $PY bench/profile_decode.py --preset small --context 4096 --new-tokens 32 --rows 20 ) &
  ( job 2 420 $PY bench/bench_fp8_gemm.py ) &
  ( job 3 90 $PY bench/profile_step.py --preset small --rows 30
    job 3 80 $PY bench/profile_step.py --preset small --set kernels=reference --rows 0
    job 3 80 $PY bench/profile_step.py --preset small --set fp8=True --rows 0
    job 3 80 $PY bench/profile_step.py --preset small --set residual=plain --rows 0 ) &
  wait
elif [ "$1" = 12 ]; then
  # FSDP2 scaling after the third session's host-side changes (foreach optimizer on local shards, no
  # host reads in the bias update), each size alone, resharding after forward on (FSDP2's default) and
  # off; then where a 4-GPU step's time goes (profile: GPU idle share, NCCL share, host phases)
  corpus
  fsdp 1 0
  fsdp 2 0,1; fsdp 2 0,1 nr --no-reshard-after-forward
  fsdp 4 0,1,2,3; fsdp 4 0,1,2,3 nr --no-reshard-after-forward
  echo "### profile, 4 GPUs" >> "$OUT/profile.log"
  timeout 120 torchrun --standalone --nproc_per_node 4 --master_port 29410 bench/profile_step.py --preset small \
      --grad-clip 1 --breakdown --no-reshard-after-forward --rows 15 >> "$OUT/profile.log" 2>&1
  echo "### profile, 1 GPU" >> "$OUT/profile.log"
  CUDA_VISIBLE_DEVICES=0 timeout 90 $PY bench/profile_step.py --preset small --grad-clip 1 --breakdown \
      --rows 15 >> "$OUT/profile.log" 2>&1
elif [ "$1" = 13 ]; then
  # after phase 11: the reverted top-k / attention kernels and the compile-safe Sinkhorn checked again;
  # then FSDP2 scaling with 2 micro-batches a step (gradients reduce-scattered once a step), each size
  # alone, and 4 GPUs with NCCL's Simple protocol (the profile showed RING_LL reduce-scatters)
  corpus
  ( job 0 120 $PY bench/gpu_check.py
    job 0 120 $PY -m pytest -q tests/test_mhc.py ) &
  ( job 1 120 $PY bench/bench_csa_select.py ) &
  ( job 2 150 $PY bench/bench_mhc.py ) &
  wait
  fsdp 1 0 ga --grad-accum 2
  fsdp 2 0,1 ga --grad-accum 2
  fsdp 4 0,1,2,3 ga --grad-accum 2
  NCCL_PROTO=Simple fsdp 4 0,1,2,3 simple
elif [ "$1" = 14 ]; then
  # FSDP2 scaling with NCCL's Simple protocol, 1 / 2 / 4 GPUs in one lease, and 4 with NCCL's choice
  corpus
  fsdp 1 0
  NCCL_PROTO=Simple fsdp 2 0,1 simple
  NCCL_PROTO=Simple fsdp 4 0,1,2,3 simple
  fsdp 4 0,1,2,3
elif [ "$1" = 15 ]; then
  # FSDP2 scaling, longer runs (45 steps: nine 5-step rows, the median of those from step 15 on)
  corpus
  STEPS=45 fsdp 1 0; STEPS=45 fsdp 2 0,1; STEPS=45 fsdp 4 0,1,2,3
elif [ "$1" = 16 ]; then
  # the fourth session (one H200): the FP8 GEMM with K slices in pairs, with and without them, and
  # every candidate at 8192^3; then the CSA kernels after the 32-bit top-k counts, the index-ordered
  # result and the FP8 indexer
  job 0 240 $PY -m pytest -q tests/test_fp8_gemm.py tests/test_csa_select.py
  job 0 480 $PY bench/bench_fp8_gemm.py --pair-ablation
  job 0 300 $PY bench/bench_fp8_gemm.py --sweep 8192 8192 8192
  job 0 200 $PY bench/bench_csa_select.py --attention-tokens 4096
elif [ "$1" = 17 ]; then
  # the fourth session's last call: model-level checks (the FP8 indexer too), the CSA bench, the step
  # time of the small preset with and without --fp8
  job 0 150 $PY -m pytest -q -x tests/test_csa_select.py tests/test_attention.py
  job 0 150 $PY bench/gpu_check.py
  job 0 200 $PY bench/bench_csa_select.py --attention-tokens 16384
  job 0 100 $PY bench/profile_step.py --preset small --rows 0
  job 0 150 $PY bench/profile_step.py --preset small --set fp8=True --rows 0
elif [ "$1" = 18 ]; then
  # the fourth session's two experiments, measured in the fifth and removed (RESULTS.md; in git at 1c52c2c)
  echo "phase 18's experiments were removed after their measurement: see RESULTS.md" >&2
elif [ "$1" = 19 ]; then
  # the fifth session (one H200, one command a call): the FP8 GEMM with each kernel timed in turn, the
  # CSA kernels with the one-launch decode top-k, the CUDA tests of the CSA kernels
  job 0 230 $PY bench/bench_fp8_gemm.py
  job 0 200 $PY bench/bench_csa_select.py --attention-tokens 4096
  job 0 150 $PY -m pytest -q -x tests/test_csa_select.py
elif [ "$1" = 20 ]; then
  # the sixth session (one H200): the FP8 GEMM with the Gluon kernel among the candidates, the CUDA tests
  # of the CSA kernels, the CSA bench with the grid top-k's histogram atomics relaxed
  job 0 300 $PY bench/bench_fp8_gemm.py
  job 0 150 $PY -m pytest -q -x tests/test_csa_select.py
  job 0 200 $PY bench/bench_csa_select.py --attention-tokens 4096
elif [ "$1" = 21 ]; then
  # the seventh session (one H200): the Gluon sparse attention's schedules side by side, then the CSA
  # kernels' CUDA tests and bench with kernels/sparse_attention_hopper.py
  job 0 200 $PY bench/exp_sparse_attention_gluon.py
  job 0 200 $PY -m pytest -q -x tests/test_csa_select.py
  job 0 200 $PY bench/bench_csa_select.py --attention-tokens 4096 16384
elif [ "$1" = 5 ]; then
  corpus
  fsdp 1 0; fsdp 2 0,1; fsdp 4 0,1,2,3     # FSDP2 scaling, each size alone on the machine
fi
