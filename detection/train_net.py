"""Detection transfer with detectron2's default trainer, as MoCo's detection/train_net.py:
R50-C4 with an extra BN after res5 (Res5ROIHeadsExtraNorm), COCO or PASCAL VOC evaluation.

    python train_net.py --config-file coco_R_50_C4_2x.yaml --num-gpus 8 MODEL.WEIGHTS intl_r50.pkl

Needs detectron2 (not on PyPI: see README.md); nothing else of this repository.
"""
import os

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.engine import DefaultTrainer, default_argument_parser, default_setup, launch
from detectron2.evaluation import COCOEvaluator, PascalVOCDetectionEvaluator
from detectron2.layers import get_norm
from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, Res5ROIHeads


@ROI_HEADS_REGISTRY.register()
class Res5ROIHeadsExtraNorm(Res5ROIHeads):
    """Res5ROIHeads with a normalisation layer (the config's RESNETS.NORM) after res5."""

    def _build_res5_block(self, cfg):
        seq, out_channels = super()._build_res5_block(cfg)
        seq.add_module("norm", get_norm(cfg.MODEL.RESNETS.NORM, out_channels))
        return seq, out_channels


class Trainer(DefaultTrainer):
    """detectron2's default trainer, scoring COCO sets with COCO's AP and VOC sets with VOC's."""

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        if "coco" in dataset_name:
            return COCOEvaluator(dataset_name, output_dir=output_folder or os.path.join(cfg.OUTPUT_DIR, "inference"))
        return PascalVOCDetectionEvaluator(dataset_name)


def setup(args):
    cfg = get_cfg()
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.freeze()
    default_setup(cfg, args)
    return cfg


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        return Trainer.test(cfg, model)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args,))
