"""End-to-end fine-tuning of the live encoders with the same heads."""
