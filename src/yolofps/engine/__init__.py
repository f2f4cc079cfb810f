"""Training loop, evaluation (COCO mAP via faster-coco-eval), checkpoints and plots."""
