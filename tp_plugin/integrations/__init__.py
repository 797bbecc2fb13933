"""Bridges between split models and the engines that train them (DeepSpeed, Accelerate, Trainer, PEFT)."""
