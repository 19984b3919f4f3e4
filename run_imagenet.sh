#!/usr/bin/env bash
# The paper's rows, one per SCHEDULE, from start to end: INTL pretraining, then the linear protocol,
# the k-NN (the authors' 5-NN and DINO's 20-NN), and semi-supervised fine-tuning on the SimCLR 1 % /
# 10 % subsets when given (ImageNet rows). ImageNet-100 (SCHEDULE=in100, DATA an ImageNet-100 folder)
# and CIFAR (SCHEDULE=cifar10, cifar100: the probe on features instead of the linear protocol).
# Runs from any directory: intl.py and eval_linear.py are those beside this script; DATA, the
# subset lists and OUT (default runs/<row>, e.g. runs/in1k-100ep) are relative to where it runs.
#
#   SCHEDULE=100 DATA=/imagenet bash run_imagenet.sh              # -> runs/in1k-100ep
#   SCHEDULE=in100 DATA=/imagenet-100 bash run_imagenet.sh        # -> runs/in100-400ep
#   SCHEDULE=cifar10 bash run_imagenet.sh     # and cifar100, from ./data -> runs/cifar10-1000ep
#   SUBSET_1=1percent.txt SUBSET_10=10percent.txt SCHEDULE=800 DATA=/imagenet bash run_imagenet.sh
#   DRY_RUN=1 SCHEDULE=800-2view DATA=/imagenet bash run_imagenet.sh    # print the commands only
#   NNODES=4 NODE_RANK=0..3 MASTER_ADDR=node0 ...                       # on each of 4 nodes
#   EXTRA_ARGS="--save-every-minutes 30 --gpu-aug --compile" ...        # more intl.py flags
#   EVAL_ARGS="--workers 16" ...                                        # more eval_linear.py flags
#
# EXTRA_ARGS go to the pretraining (intl.py) and EVAL_ARGS to the evaluation stages (eval_linear.py:
# linear, k-NN, fine-tuning), each split on spaces and placed last, so that they override the row's
# flags: the two scripts take different flags, and one unknown to eval_linear.py would stop the
# evaluation only once the pretraining had ended. One process per GPU: the entries of
# CUDA_VISIBLE_DEVICES when set, else nvidia-smi's count; NPROC overrides both. One process on one
# node runs python3 itself; more run under torchrun.
#
# A stage is done when its script says so: it writes OUT/<stage>/done once the whole stage has
# finished (the last epoch of its schedule). A rerun skips the stages that are done and resumes the
# others from their checkpoints. A stage that ends without being done (EXTRA_ARGS="--stop-epoch 50",
# to split a run over job-time limits) stops the row with exit code 75: run the same command again to
# continue it. A stage that fails or is stopped by a signal stops the row with its exit code.
set -euo pipefail
# a stop signal to the whole job (Slurm's, Ctrl-C's): the stage in flight saves and exits, and this
# script, which bash lets run a trap only once that stage has ended, stops with the signal's code
trap 'exit 143' TERM
trap 'exit 130' INT
trap 'exit 138' USR1
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

SCHEDULE=${SCHEDULE:-100}
case $SCHEDULE in cifar10|cifar100) DATA=${DATA:-$SCHEDULE} ;; esac
: "${DATA:?set DATA to the ImageNet folder (DATA/train/<class>/, DATA/val/<class>/)}"
if [[ -n ${CUDA_VISIBLE_DEVICES:-} ]]; then
  IFS=, read -r -a visible <<< "$CUDA_VISIBLE_DEVICES"
  gpus=${#visible[@]}
else
  gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
fi
NPROC=${NPROC:-$(( gpus > 0 ? gpus : 1 ))}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}

# one row of the paper: epochs, base lr, method, crops, linear-eval lr, and the backbone lr of
# semi-supervised fine-tuning (0.004 for INTL-M checkpoints, 0.006 for INTL); ImageNet rows
# share the ResNet-50, its 8192-8192-8192 projector, batch 256, weight decay 1e-5 and INTL-M's
# momentum m0 0.996; `name` names the output folder for the data, the epochs and the views
arch=resnet50 projector=8192-8192-8192 batch=256 wd=1e-5 m0=0.996 name=""
two=--no-multi-crop     # two views (intl.py's default on an image folder is multi-crop)
case $SCHEDULE in
  100)       epochs=100 lr=0.5 method=intl-m crops=--multi-crop linear_lr=0.4 backbone_lr=0.004 ;;
  200)       epochs=200 lr=0.4 method=intl-m crops=--multi-crop linear_lr=0.4 backbone_lr=0.004 ;;
  400)       epochs=400 lr=0.4 method=intl-m crops=--multi-crop linear_lr=0.4 backbone_lr=0.004 ;;
  800)       epochs=800 lr=0.3 method=intl-m crops=--multi-crop linear_lr=0.4 backbone_lr=0.004 ;;
  800-2view) epochs=800 lr=0.3 method=intl   crops=$two         linear_lr=0.2 backbone_lr=0.006
             name=in1k-800ep-2views ;;
  in100)     epochs=400 lr=0.5 method=intl   crops=$two         linear_lr=0.2 backbone_lr=""
             arch=resnet18 projector=4096-4096-8192 batch=128 wd=2.5e-5 name=in100-400ep ;;
  cifar10|cifar100)    # the 32-px setting comes with --data; linear: the probe on features
             epochs=1000 lr=0.3 method=intl crops="" linear_lr="" backbone_lr=""
             arch=resnet18 projector=2048-2048-2048 batch=256 wd=1e-4
             name=$SCHEDULE-1000ep ;;
  *) echo "error: SCHEDULE must be 100, 200, 400, 800, 800-2view, in100, cifar10 or cifar100," \
          "not '$SCHEDULE'" >&2
     exit 2 ;;
esac
OUT=${OUT:-runs/${name:-in1k-${epochs}ep}}
read -r -a extra <<< "${EXTRA_ARGS:-}"
read -r -a eval_extra <<< "${EVAL_ARGS:-}"

torchrun=(torchrun --nproc_per_node="$NPROC" --nnodes="$NNODES" --node_rank="$NODE_RANK"
          --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT")
(( NPROC * NNODES > 1 )) || torchrun=(python3)

# stage NAME COMMAND...: run COMMAND unless OUT/NAME/done exists; with DRY_RUN=1 print it on one
# line instead
stage() {
  local dir=$OUT/$1; shift
  if [[ -e $dir/done ]]; then
    echo "skip: $dir is done" >&2
  elif [[ -n ${DRY_RUN:-} && ${DRY_RUN} != 0 ]]; then
    local line; printf -v line '%q ' "$@"; echo "${line% }"
  else
    "$@"
    if [[ ! -e $dir/done ]]; then
      echo "run_imagenet.sh: $dir stopped before the end of its schedule (no $dir/done);" \
           "run the same command again to continue it" >&2
      exit 75
    fi
  fi
}

momentum=()     # INTL-M's momentum target; INTL has none, and intl.py refuses the flag with it
[[ $method == intl-m ]] && momentum=(--target-momentum "$m0")
stage pretrain "${torchrun[@]}" "$here/intl.py" --data "$DATA" --method $method $crops \
  --arch $arch --projector $projector --batch-size $batch --wd $wd "${momentum[@]}" \
  --epochs $epochs --lr $lr --output-dir "$OUT/pretrain" "${extra[@]}"

backbone=$OUT/pretrain/backbone.pth
linear=(--lr-classifier "$linear_lr")
[[ -n $linear_lr ]] || linear=(--protocol features)
stage linear "${torchrun[@]}" "$here/eval_linear.py" --data "$DATA" --arch $arch \
  --pretrained "$backbone" "${linear[@]}" --output-dir "$OUT/linear" "${eval_extra[@]}"
stage knn "${torchrun[@]}" "$here/eval_linear.py" --data "$DATA" --arch $arch \
  --pretrained "$backbone" --knn --output-dir "$OUT/knn" "${eval_extra[@]}"

for pct in 1 10; do
  list_var=SUBSET_$pct
  if [[ -n ${!list_var:-} && -n $backbone_lr ]]; then
    stage semi-$pct "${torchrun[@]}" "$here/eval_linear.py" --data "$DATA" --arch $arch \
      --pretrained "$backbone" --weights finetune --train-subset "${!list_var}" --epochs 20 \
      --lr-classifier 0.2 --lr-backbone $backbone_lr --output-dir "$OUT/semi-$pct" \
      "${eval_extra[@]}"
  fi
done
[[ -n ${DRY_RUN:-} && ${DRY_RUN} != 0 ]] || echo "run_imagenet.sh: every stage of $OUT is done" >&2
