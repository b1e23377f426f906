"""Prediction: tiles and blending (`tiling`), the plan of a run (`plan`), running it (`predict`) into sinks
(`outputs`), and objects from a prediction (`instances`).
"""
