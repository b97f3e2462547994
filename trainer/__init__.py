"""promptserve trainer: few-shot prompt learning on a frozen open_clip CLIP."""
