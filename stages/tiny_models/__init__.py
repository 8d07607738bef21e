"""models tiny: random-weight Whisper and Llama directories, small enough for a laptop and for tests."""
