"""Fine-tuning the fused UNet on painted strokes: the recipe and trainer (`train`) and the one fine-tuning path every
driver uses (`finetune`).
"""
