"""Probability to call, trust, score and ship: inference, calibration and call rules, the gate, metrics, model folders."""
