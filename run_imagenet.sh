#!/usr/bin/env bash
# The paper's ImageNet results: INTL pretraining of a ResNet-50, then the linear protocol, then
# semi-supervised fine-tuning on the SimCLR 1 % / 10 % subsets when given; and its ImageNet-100
# row (ResNet-18, SCHEDULE=in100, DATA an ImageNet-100 folder), pretraining and linear protocol.
#
#   SCHEDULE=100 DATA=/imagenet OUT=runs/imagenet-100 bash run_imagenet.sh
#   SCHEDULE=in100 DATA=/imagenet-100 bash run_imagenet.sh
#   SCHEDULE=cifar10 bash run_imagenet.sh         # and cifar100: the data set in ./data
#   SUBSET_1=1percent.txt SUBSET_10=10percent.txt SCHEDULE=800 DATA=/imagenet bash run_imagenet.sh
#   DRY_RUN=1 SCHEDULE=800-2view DATA=/imagenet bash run_imagenet.sh    # print the commands only
#   NNODES=4 NODE_RANK=0..3 MASTER_ADDR=node0 ...                       # on each of 4 nodes
#
# Re-running resumes each stage from its checkpoint (intl.py and eval_linear.py resume from
# their output folder) and skips the stages whose folder holds a `done` marker.
set -euo pipefail

SCHEDULE=${SCHEDULE:-100}
case $SCHEDULE in cifar10|cifar100) DATA=${DATA:-$SCHEDULE} ;; esac
: "${DATA:?set DATA to the ImageNet folder (DATA/train/<class>/, DATA/val/<class>/)}"
OUT=${OUT:-runs/imagenet-$SCHEDULE}
gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
NPROC=${NPROC:-$(( gpus > 0 ? gpus : 1 ))}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}

# one row of the paper: epochs, base lr, method, crops, linear-eval lr, and the backbone lr of
# semi-supervised fine-tuning (0.004 for INTL-M checkpoints, 0.006 for INTL); ImageNet rows
# share the ResNet-50, its 8192-8192-8192 projector, batch 256 and weight decay 1e-5
arch=resnet50 projector=8192-8192-8192 batch=256 wd=1e-5 m0=0.996 knn=""
case $SCHEDULE in
  100)       epochs=100 lr=0.5 method=intl-m crops=--multi-crop linear_lr=0.4 backbone_lr=0.004 ;;
  200)       epochs=200 lr=0.4 method=intl-m crops=--multi-crop linear_lr=0.4 backbone_lr=0.004 ;;
  400)       epochs=400 lr=0.4 method=intl-m crops=--multi-crop linear_lr=0.4 backbone_lr=0.004 ;;
  800)       epochs=800 lr=0.3 method=intl-m crops=--multi-crop linear_lr=0.4 backbone_lr=0.004 ;;
  800-2view) epochs=800 lr=0.3 method=intl   crops=""           linear_lr=0.2 backbone_lr=0.006 ;;
  in100)     epochs=400 lr=0.5 method=intl   crops=""           linear_lr=0.2 backbone_lr=""
             arch=resnet18 projector=4096-4096-8192 batch=128 wd=2.5e-5 knn=1 ;;
  cifar10|cifar100)    # the 32-px setting comes with --data; linear: the probe on features
             epochs=1000 lr=0.3 method=intl crops="" linear_lr="" backbone_lr=""
             arch=resnet18 projector=2048-2048-2048 batch=256 wd=1e-4 m0=0.999 knn=1 ;;
  *) echo "error: SCHEDULE must be 100, 200, 400, 800, 800-2view, in100, cifar10 or cifar100, not '$SCHEDULE'" >&2
     exit 2 ;;
esac

torchrun=(torchrun --nproc_per_node="$NPROC" --nnodes="$NNODES" --node_rank="$NODE_RANK"
          --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT")

# stage NAME COMMAND...: run COMMAND unless OUT/NAME/done exists, then mark it done;
# with DRY_RUN=1 print it on one line instead
stage() {
  local dir=$OUT/$1; shift
  if [[ -e $dir/done ]]; then
    echo "skip: $dir is done" >&2
  elif [[ -n ${DRY_RUN:-} && ${DRY_RUN} != 0 ]]; then
    local line; printf -v line '%q ' "$@"; echo "${line% }"
  else
    mkdir -p "$dir"
    "$@"
    touch "$dir/done"
  fi
}

stage pretrain "${torchrun[@]}" intl.py --data "$DATA" --method $method $crops --arch $arch \
  --projector $projector --batch-size $batch --wd $wd --momentum $m0 \
  --epochs $epochs --lr $lr --output-dir "$OUT/pretrain"

backbone=$OUT/pretrain/backbone.pth
linear=(--lr "$linear_lr")
[[ -n $linear_lr ]] || linear=(--protocol features)
stage linear "${torchrun[@]}" eval_linear.py --data "$DATA" --arch $arch --pretrained "$backbone" \
  "${linear[@]}" --output-dir "$OUT/linear"
if [[ -n $knn ]]; then
  stage knn "${torchrun[@]}" eval_linear.py --data "$DATA" --arch $arch --pretrained "$backbone" \
    --knn --output-dir "$OUT/knn"
fi

for pct in 1 10; do
  list_var=SUBSET_$pct
  if [[ -n ${!list_var:-} && -n $backbone_lr ]]; then
    stage semi-$pct "${torchrun[@]}" eval_linear.py --data "$DATA" --arch $arch --pretrained "$backbone" \
      --weights finetune --train-subset "${!list_var}" --epochs 20 \
      --lr-classifier 0.2 --lr-backbone $backbone_lr --output-dir "$OUT/semi-$pct"
  fi
done
