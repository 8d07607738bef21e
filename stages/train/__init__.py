"""train: the examples -> a trained speech-text model checkpoint, with torchrun.

``stage`` the contract; ``launcher`` torchrun as a watched child process; ``worker`` what each process runs;
``trainer`` setup, the loop, cleanup; ``checkpoint`` the resumable checkpoint format; ``logs`` metrics,
TensorBoard and the loss plot. The model, loader and features are shared with evaluate (``core.lsm``).
"""
