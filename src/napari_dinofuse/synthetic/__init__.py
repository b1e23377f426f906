"""The synthetic EM sample: a world rendered at raw and context resolution with ground truth and scribbles (`sample`).
"""
